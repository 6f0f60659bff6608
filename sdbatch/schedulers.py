"""Schedulers by name, each built from the loaded pipeline's own scheduler config.

Only class names live here, so a spec can be validated without importing diffusers. Switching
scheduler builds a new scheduler object from the model's config; the weights stay where they are.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers class, config overrides). Overrides pin what the name promises (Karras
# sigmas or not, the solver variant), whichever scheduler the model shipped with.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
    "deis": ("DEISMultistepScheduler", {"use_karras_sigmas": False}),
    "kdpm2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """Build scheduler `name` from a pipeline's scheduler config (`Class.from_config`)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def describe(names: list[str]) -> dict[str, dict[str, Any]]:
    """The class and overrides behind each name, for the run's provenance."""
    return {n: {"class": SCHEDULERS[n][0], "overrides": SCHEDULERS[n][1]} for n in names}
