"""Spec validation: every bad input is one line naming the field, exit code 2, nothing written."""

from __future__ import annotations

import math

import pytest
from conftest import REPO, job

from sdbatch.cli import main
from sdbatch.errors import InputError
from sdbatch.schedulers import SCHEDULERS
from sdbatch.spec import JobSpec, PromptSource, Sweep, load_spec, parse_spec


def test_valid_spec_resolves_paths_and_defaults(tmp_path, prompt_file, spec_file):
    prompt_file()
    (tmp_path / "jobs").mkdir()
    path = spec_file(job("../prompts.parquet", name="sweep"), "jobs/sweep.yaml")
    spec = load_spec(path)
    assert spec.prompts.path == str(tmp_path / "prompts.parquet")
    assert spec.sweep.scheduler == ("ddim", "euler_a")
    assert spec.sweep.guidance_scale == (1.0, 7.5)
    assert spec.runtime.actors == "auto"
    assert spec.output is None and spec.name == "sweep"


def test_scalars_stand_for_one_element_lists(prompt_file):
    spec = parse_spec(job(prompt_file(), sweep={"scheduler": "pndm", "guidance_scale": 3}))
    assert spec.sweep.scheduler == ("pndm",)
    assert spec.sweep.guidance_scale == (3.0,)


BAD_FIELDS = [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"sweep": {"sampler": ["ddim"]}}, "sweep.sampler", "unknown field"),
    ({"runtime": {"gpus": 2}}, "runtime.gpus", "unknown field"),
    ({"seed": "zero"}, "seed", "must be an integer"),
    ({"seed": -1}, "seed", "between 0"),
    ({"sweep": {"num_inference_steps": ["ten"]}}, "sweep.num_inference_steps[0]", "integer"),
    ({"sweep": {"num_inference_steps": [2, 0]}}, "sweep.num_inference_steps[1]", ">= 1"),
    ({"sweep": {"num_inference_steps": [True]}}, "sweep.num_inference_steps[0]", "integer"),
    ({"sweep": {"num_inference_steps": []}}, "sweep.num_inference_steps", "at least one"),
    ({"sweep": {"scheduler": []}}, "sweep.scheduler", "at least one"),
    ({"sweep": {"scheduler": ["ddim", "warp9"]}}, "sweep.scheduler[1]", "unknown scheduler"),
    ({"sweep": {"scheduler": ["ddim", "ddim"]}}, "sweep.scheduler", "listed twice"),
    ({"sweep": {"guidance_scale": [-1.0]}}, "sweep.guidance_scale[0]", "finite number >= 0"),
    ({"sweep": {"guidance_scale": [math.nan]}}, "sweep.guidance_scale[0]", "finite"),
    ({"sweep": {"guidance_scale": [math.inf]}}, "sweep.guidance_scale[0]", "finite"),
    ({"sweep": {"guidance_scale": ["high"]}}, "sweep.guidance_scale[0]", "must be a number"),
    ({"sweep": {"height": 100}}, "sweep.height", "multiple of 8"),
    ({"sweep": {"width": 0}}, "sweep.width", "multiple of 8"),
    ({"sweep": {"images_per_prompt": 0}}, "sweep.images_per_prompt", ">= 1"),
    ({"runtime": {"dtype": "fp8"}}, "runtime.dtype", "'auto' or 'fp16'"),
    ({"runtime": {"actors": 0}}, "runtime.actors", "'auto' or >= 1"),
    ({"runtime": {"actors": "many"}}, "runtime.actors", "must be an integer or 'auto'"),
    ({"runtime": {"batch_size": 0}}, "runtime.batch_size", ">= 1"),
    ({"runtime": {"png_compress_level": 10}}, "runtime.png_compress_level", "0 and 9"),
    ({"prompts": {"limit": 0}}, "prompts.limit", ">= 1"),
    ({"prompts": {"blank": "drop"}}, "prompts.blank", "must be 'error' or 'skip', got 'drop'"),
    ({"prompts": "prompts.parquet"}, "prompts", "mapping"),
    ({"model": ""}, "model", "must name"),
    ({"model_allow_pickle": "yes"}, "model_allow_pickle", "must be true or false"),
]


@pytest.mark.parametrize(("override", "field", "message"), BAD_FIELDS)
def test_bad_field_is_one_line_naming_it(override, field, message, prompt_file, spec_file, capsys):
    path = spec_file(job(prompt_file(), **override))
    out = path.parent / "out"
    assert main(["generate", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"sdbatch: error: {field}: "), err
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "field", "message"), [b for b in BAD_FIELDS if b[1] != "colour"]
)
def test_a_spec_built_in_python_is_checked_like_yaml(override, field, message, prompt_file):
    """JobSpec(...) with the same data raises the same one-line error as the YAML path (an
    unknown top-level field is Python's own TypeError instead)."""
    data = job(prompt_file(), **override)
    with pytest.raises(InputError) as from_yaml:
        parse_spec(data)
    with pytest.raises(InputError) as from_python:
        JobSpec(**data)
    assert str(from_python.value) == str(from_yaml.value)
    assert str(from_python.value).startswith(f"{field}: ")


def test_a_spec_built_in_python_equals_the_one_read_from_yaml(prompt_file):
    data = job(prompt_file(), sweep={"scheduler": "pndm", "guidance_scale": [3, 7.5]})
    python = JobSpec(
        name="test",
        model="builtin:tiny",
        prompts=PromptSource(str(prompt_file())),
        sweep=Sweep(
            scheduler=["pndm"],
            num_inference_steps=[2],
            guidance_scale=[3, 7.5],
            images_per_prompt=2,
            height=32,
            width=32,
        ),
        seed=7,
        runtime={"batch_size": 4, "shard_size": 2},
    )
    assert python == parse_spec(data)
    assert python.sweep.guidance_scale == (3.0, 7.5) and python.sweep.scheduler == ("pndm",)
    with pytest.raises(InputError, match=r"^num_inference_steps\[1\]: must be >= 1, got 0$"):
        Sweep(num_inference_steps=[2, 0])


def test_unknown_scheduler_lists_the_known_ones(prompt_file):
    with pytest.raises(InputError) as e:
        parse_spec(job(prompt_file(), sweep={"scheduler": ["warp9"]}))
    assert all(name in str(e.value) for name in SCHEDULERS)


def test_missing_required_field(prompt_file):
    data = job(prompt_file())
    del data["model"]
    with pytest.raises(InputError, match=r"^model: required field is missing$"):
        parse_spec(data)


def test_spec_file_errors(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("sweep: [unclosed\n")
    assert main(["generate", str(broken)]) == 2
    assert "is not valid YAML (line" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert main(["generate", str(listy)]) == 2
    assert "must be a mapping" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_yaml_is_never_evaluated_as_code(tmp_path, command):
    """A job spec or a suite with a tag that PyYAML's unsafe loaders would call is refused."""
    pwned = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {pwned}']\n")
    args = [str(evil)] if command == "generate" else [str(tmp_path), "--suite", str(evil)]
    assert main([command, *args]) == 2
    assert not pwned.exists()


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_specs_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
