"""Schedulers by name, each built from the loaded pipeline's own scheduler config, and the UNet
evaluations each one makes per image: the deterministic cost of a configuration.

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


# Heun's method and DPM2 evaluate twice per step but the last, a plain Euler step to sigma 0, as
# in Karras et al. 2022 (arXiv:2206.00364, Alg. 1): 2n - 1 evaluations for n steps.
SECOND_ORDER = frozenset({"heun", "kdpm2", "kdpm2_a"})


def unet_evaluations(name: str, steps: int) -> int:
    """UNet evaluations scheduler `name` makes for one image in `steps` steps, without guidance
    (counted in diffusers 0.42; tests/test_worker.py counts them again on every scheduler)."""
    if name in SECOND_ORDER:
        return 2 * steps - 1
    if name == "pndm":
        # PLMS (skip_prk_steps) evaluates its first timestep twice to start its multistep history.
        return steps + 1 if steps > 1 else steps
    return steps


def guidance_passes(guidance_scale: float) -> int:
    """UNet passes per evaluation: diffusers runs classifier-free guidance, an unconditional and
    a conditional pass, when guidance_scale > 1 (for models without a guidance embedding)."""
    return 2 if guidance_scale > 1 else 1


def unet_evals_per_image(name: str, steps: int, guidance_scale: float) -> int:
    """The model evaluations one image costs: its sampler's evaluations x guidance passes."""
    return unet_evaluations(name, steps) * guidance_passes(guidance_scale)


def make_scheduler(name: str, base_config: Any) -> Any:
    """Build scheduler `name` from a pipeline's scheduler config (`Class.from_config`)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def describe(names: list[str]) -> dict[str, dict[str, Any]]:
    """The class and overrides behind each name, for the run's provenance."""
    return {n: {"class": SCHEDULERS[n][0], "overrides": SCHEDULERS[n][1]} for n in names}
