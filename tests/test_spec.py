"""Spec validation: every bad input is one line naming the field, exit code 2, nothing written."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import REPO, job

from sdbatch.cli import main
from sdbatch.errors import MAX_MESSAGE, InputError
from sdbatch.schedulers import SCHEDULERS
from sdbatch.spec import JobSpec, PromptSource, Sweep, load_spec, parse_spec
from sdbatch.typed_data import shown


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


STEPS = "between 1 and 1,000 (diffusers schedulers train on 1,000 timesteps)"
SIDE = "multiple of 8 (the VAE's downsampling) from 8 to 4,096"
NAME = "must be 1 to 100 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
BAD_FIELDS = [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"sweep": {"sampler": ["ddim"]}}, "sweep.sampler", "unknown field"),
    ({"runtime": {"gpus": 2}}, "runtime.gpus", "unknown field"),
    ({"sweep": {"schedulers": ["ddim"]}}, "sweep.schedulers", "field (did you mean scheduler?);"),
    ({"sweep": {"scheduler": ["eular"]}}, "sweep.scheduler[0]", "'eular' (did you mean euler?);"),
    ({"seed": "zero"}, "seed", "must be an integer"),
    ({"seed": -1}, "seed", "between 0"),
    ({"seed": 2**63}, "seed", "between 0 and 9,223,372,036,854,775,807, got 9223372036854775808"),
    ({"sweep": {"num_inference_steps": ["ten"]}}, "sweep.num_inference_steps[0]", "integer"),
    ({"sweep": {"num_inference_steps": [2, 0]}}, "sweep.num_inference_steps[1]", STEPS),
    ({"sweep": {"num_inference_steps": [1001]}}, "sweep.num_inference_steps[0]", STEPS),
    ({"sweep": {"num_inference_steps": 10**30}}, "sweep.num_inference_steps[0]", "got 1000000"),
    ({"sweep": {"num_inference_steps": 1e30}}, "sweep.num_inference_steps[0]", "an integer"),
    ({"sweep": {"num_inference_steps": [True]}}, "sweep.num_inference_steps[0]", "integer"),
    ({"sweep": {"num_inference_steps": []}}, "sweep.num_inference_steps", "at least one"),
    ({"sweep": {"scheduler": []}}, "sweep.scheduler", "at least one"),
    ({"sweep": {"scheduler": ["ddim", "warp9"]}}, "sweep.scheduler[1]", "unknown scheduler"),
    ({"sweep": {"scheduler": ["ddim", "ddim"]}}, "sweep.scheduler", "listed twice"),
    ({"sweep": {"scheduler": ["x" * 10_000]}}, "sweep.scheduler[0]", "'xxxxxxxxxx"),
    ({"sweep": {"guidance_scale": [-1.0]}}, "sweep.guidance_scale[0]", "between 0 and 100"),
    ({"sweep": {"guidance_scale": [math.nan]}}, "sweep.guidance_scale[0]", "100, got nan"),
    ({"sweep": {"guidance_scale": [math.inf]}}, "sweep.guidance_scale[0]", "100, got inf"),
    ({"sweep": {"guidance_scale": [1e308]}}, "sweep.guidance_scale[0]", "between 0 and 100"),
    ({"sweep": {"guidance_scale": ["high"]}}, "sweep.guidance_scale[0]", "must be a number"),
    (
        {"sweep": {"num_inference_steps": list(range(1, 101)), "guidance_scale": list(range(101))}},
        "sweep.scheduler x num_inference_steps x guidance_scale",
        "20,200 configurations; at most 10,000",
    ),
    ({"sweep": {"height": 100}}, "sweep.height", SIDE),
    ({"sweep": {"height": 800_000}}, "sweep.height", SIDE),
    ({"sweep": {"width": 0}}, "sweep.width", SIDE),
    ({"sweep": {"width": 4104}}, "sweep.width", SIDE),
    ({"sweep": {"images_per_prompt": 0}}, "sweep.images_per_prompt", "between 1 and 10,000"),
    ({"sweep": {"images_per_prompt": 10**6}}, "sweep.images_per_prompt", "between 1 and 10,000"),
    ({"sweep": {"negative_prompt": ["a"]}}, "sweep.negative_prompt", "must be a string"),
    ({"runtime": {"dtype": "fp8"}}, "runtime.dtype", "'auto' or 'fp16'"),
    ({"runtime": {"actors": 0}}, "runtime.actors", "between 1 and 1,024 (or auto: one per GPU)"),
    ({"runtime": {"actors": 100_000}}, "runtime.actors", "between 1 and 1,024"),
    ({"runtime": {"actors": "many"}}, "runtime.actors", "must be an integer or 'auto'"),
    ({"runtime": {"batch_size": 0}}, "runtime.batch_size", "between 1 and 1,024"),
    ({"runtime": {"batch_size": 10**6}}, "runtime.batch_size", "between 1 and 1,024"),
    ({"runtime": {"shard_size": 0}}, "runtime.shard_size", "between 1 and 10,000"),
    ({"runtime": {"shard_size": 10**9}}, "runtime.shard_size", "between 1 and 10,000"),
    ({"runtime": {"retries": -1}}, "runtime.retries", "between 0 and 10"),
    ({"runtime": {"retries": 10**6}}, "runtime.retries", "between 0 and 10"),
    ({"runtime": {"png_compress_level": 10}}, "runtime.png_compress_level", "between 0 and 9"),
    ({"runtime": "fast"}, "runtime", "must be a mapping of fields"),
    ({"prompts": {"limit": 0}}, "prompts.limit", ">= 1"),
    ({"prompts": {"blank": "drop"}}, "prompts.blank", "must be 'error' or 'skip', got 'drop'"),
    ({"prompts": "prompts.parquet"}, "prompts", "mapping"),
    ({"prompts": {"path": "nope.parquet"}}, "prompts.path", "does not exist"),
    ({"model": ""}, "model", "must name"),
    ({"model": []}, "model", "must list at least one value"),
    ({"model": ["builtin:tiny", "builtin:tiny"]}, "model", "'builtin:tiny' is listed twice"),
    ({"model": ["builtin:tiny", " "]}, "model[1]", "must name"),
    ({"model": {"ref": "builtin:tiny"}}, "model", "must be a string or a list"),
    ({"model": ["a/b", "c/d"], "model_revision": "main"}, "model_revision", "pins one hub model"),
    ({"sweep": {"lora": []}}, "sweep.lora", "must list"),
    ({"sweep": {"lora": [None, None]}}, "sweep.lora", "None is listed twice"),
    ({"sweep": {"lora": ["builtin:x"]}}, "sweep.lora[0]", "must be a mapping of fields or null"),
    ({"sweep": {"lora": [{"scale": 1}]}}, "sweep.lora[0].path", "required field is missing"),
    ({"sweep": {"lora": [{"path": "a", "scale": [1, 1]}]}}, "sweep.lora[0].scale", "twice"),
    ({"sweep": {"lora": [{"path": "a", "scale": 50}]}}, "sweep.lora[0].scale[0]", "-10 and 10"),
    ({"sweep": {"lora": [{"path": "a", "scale": []}]}}, "sweep.lora[0].scale", "at least one"),
    (
        {"sweep": {"lora": [{"path": "a"}, {"path": "a", "scale": 0.5}]}},
        "sweep.lora",
        "'a' is listed twice",
    ),
    (
        {
            "sweep": {
                "lora": [None, {"path": "a", "scale": list(range(5))}],
                "height": 8,
                "guidance_scale": list(range(50)),
                "num_inference_steps": list(range(1, 51)),
            }
        },
        "sweep.lora x scheduler x num_inference_steps x guidance_scale",
        "30,000 configurations",
    ),
    ({"baseline": {"model": "builtin:toy"}}, "baseline.model", "not one of the spec's models"),
    ({"baseline": {"lora": "a"}}, "baseline.lora_scale", "must be set with baseline.lora"),
    ({"baseline": {"lora": "a", "lora_scale": 1}}, "baseline.lora", "not one of sweep.lora's"),
    ({"baseline": {"lora_scale": 1}}, "baseline.lora_scale", "must be set with baseline.lora"),
    ({"model_allow_pickle": "yes"}, "model_allow_pickle", "must be true or false"),
    ({"name": "../../x"}, "name", NAME),
    ({"name": "a/b"}, "name", NAME),
    ({"name": ".hidden"}, "name", NAME),
    ({"name": "-rf"}, "name", NAME),
    ({"name": ""}, "name", NAME),
    ({"name": "a\nb"}, "name", "got 'a\\nb'"),
    ({"name": "x" * 101}, "name", NAME),
    ({"name": 12}, "name", "must be a string"),
]


@pytest.mark.parametrize(("override", "field", "message"), BAD_FIELDS)
def test_bad_field_is_one_line_naming_it(override, field, message, prompt_file, spec_file, refused):
    path = spec_file(job(prompt_file(), **override))
    out = path.parent / "out"
    err = refused("generate", path, "--out", out)
    assert err.startswith(f"{field}: "), err
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [b for b in BAD_FIELDS if b[1] not in ("colour", "prompts.path")],
)
def test_a_spec_built_in_python_is_checked_like_yaml(override, field, message, prompt_file):
    """JobSpec(...) with the same data raises the same one-line error as the YAML path (an
    unknown top-level field is Python's own TypeError instead; a missing prompt file is found
    when generate reads it)."""
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
    with pytest.raises(InputError, match=r"^num_inference_steps\[1\]: must be between 1 and "):
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


HEAD = "model: builtin:tiny\nprompts: {path: prompts.parquet}\n"  # lines 1-2 of every file


def laughs(levels: int) -> str:
    """The "billion laughs" in `name`: each anchor holds 9 aliases of the one before."""
    parts = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"name: [{', '.join(parts)}]\n"


HOSTILE_FILES = {
    "billion-laughs": (
        HEAD + laughs(10),
        "expands to over 10,000 values (aliases counted as copies) (line 3)",
    ),
    "101-aliases": (
        HEAD + "name: &x t\n" + "".join(f"k{i}: *x\n" for i in range(101)),
        "has over 100 aliases",
    ),
    "self-alias": (
        HEAD + "sweep: {scheduler: &s [ddim, *s]}\n",
        "has an alias inside its own anchor (line 3)",
    ),
    "10k-values": (HEAD + "sweep: {guidance_scale: [" + "1, " * 10_000 + "]}\n", "over 10,000"),
    "5000-deep": (HEAD + "name: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),  # libyaml's limit
    "21-deep": (HEAD + "name: " + "[" * 21 + "]" * 21 + "\n", "nests deeper than 20 levels"),
    "5000-digits": (HEAD + "seed: " + "9" * 5000 + "\n", "has an integer of over 100 digits"),
    "over-1MiB": (HEAD + "name: " + "x" * (1 << 20) + "\n", "is over 1024 KiB"),
    "unclosed": (HEAD + "sweep: [unclosed\n", "is not valid YAML (line 4)"),
    "unclosed-list": (
        HEAD + "sweep:\n  scheduler: [ddim\n  steps: [2]\nseed: 1\n",
        "(line 5): did not find expected ',' or ']', while parsing a flow sequence from line 4",
    ),
    "unknown-tag": (HEAD + "name: !foo bar\n", "is not valid YAML (line 3): could not determine"),
    "int-keys": (HEAD + "name: t\n1: 2\nnull: 3\n", "1: unknown field; allowed here: name, "),
    "long-key": (HEAD + "? " + "k" * 100_000 + "\n: 1\n", "'kkkkkkkk"),
    "newline-key": (HEAD + 'name: t\n"a\\nb": 1\n', "'a\\nb': unknown field"),
    "long-value": (HEAD + "name: t\nseed: " + "x" * 500_000 + "\n", "integer, got 'xxxxx"),
    "date": (HEAD + "name: t\nseed: 2001-12-14\n", "seed: must be an integer, got datetime.date("),
    "nan-steps": (HEAD + "name: t\nsweep: {num_inference_steps: .nan}\n", "integer, got nan"),
    "binary-name": (HEAD + "name: !!binary aGVsbG8=\n", "name: must be a string, got b'hello'"),
    "list-name": (HEAD + "name: [t]\n", "name: must be a string, got ['t']"),
    "newline-model": (
        'name: t\nprompts: {path: prompts.parquet}\nmodel: "' + "a\\n" * 3000 + '"\n',
        "model: no folder 'a\\na",
    ),
    "long-path": (
        "name: t\nmodel: builtin:tiny\nprompts: {path: " + "p/" * 5000 + "}\n",
        "does not exist",
    ),
    "empty": ("", "must be a mapping of fields, like jobs/demo.yaml"),
    "list": ("- a\n- b\n", "must be a mapping of fields"),
}


@pytest.mark.parametrize("case", HOSTILE_FILES)
def test_hostile_spec_files_are_one_line_errors(case, tmp_path, prompt_file, refused):
    """Bombs of time and memory, and values that would make long or many-line errors, are
    refused quickly (the fixture times them and weighs their memory) in one short line."""
    text, message = HOSTILE_FILES[case]
    prompt_file()
    path = tmp_path / "job.yaml"
    path.write_text(text)
    err = refused("generate", path, "--out", tmp_path / "out")
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "device", "not-utf8", "stem"])
def test_spec_files_that_are_not_specs(kind, tmp_path, prompt_file, refused):
    """Only a regular UTF-8 file is read (a FIFO or /dev/zero would never end); a spec without
    `name` is named after its file, which must then make a safe name."""
    path = {
        "missing": tmp_path / "nope.yaml",
        "folder": tmp_path,
        "fifo": tmp_path / "fifo.yaml",
        "device": Path("/dev/zero"),
        "not-utf8": tmp_path / "latin1.yaml",
        "stem": tmp_path / "my job.yaml",
    }[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "not-utf8":
        path.write_bytes(HEAD.encode() + "name: caf\u00e9\n".encode("latin-1"))
    if kind == "stem":
        prompt_file()
        path.write_text(HEAD)
    err = refused("generate", path, "--out", tmp_path / "out")
    assert {
        "missing": "spec: " + str(path) + " does not exist",
        "folder": "is not a file",
        "fifo": "is not a file",
        "device": "is not a file",
        "not-utf8": "is not UTF-8 text",
        "stem": "name: must be 1 to 100 letters",
    }[kind] in err
    assert not (tmp_path / "out").exists()


def test_a_name_cannot_write_outside_out(tmp_path, prompt_file, spec_file, monkeypatch, refused):
    """`name` picks the default output folder out/NAME: ../ in it must not climb out."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = spec_file(job(prompt_file(), name="../../../escaped"))
    assert refused("generate", path).startswith("name: must be 1 to 100 letters")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "job.yaml", "prompts.parquet"]


def test_an_error_is_one_short_line_whatever_it_quotes():
    """Values are quoted cut short; a message that quotes one whole keeps its two ends."""
    assert shown(10**5000) == "<an integer of 16610 bits>"
    assert len(shown("x" * 10**6)) <= 60 and len(shown([[["deep"] * 100] * 100] * 100)) <= 60
    error = InputError("model: no folder " + "a\n" * 10**5 + "; it is not a hub id")
    assert "\n" not in str(error) and len(str(error)) == MAX_MESSAGE
    assert str(error).startswith("model: no folder a a") and str(error).endswith("not a hub id")


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
