"""The README says what the code does: its blocks of defaults are the dataclasses' defaults, and its
Python example runs."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml
from conftest import REPO

from sdbatch.evaluation.suite import Suite
from sdbatch.spec import JobSpec

README = (REPO / "README.md").read_text()


def block_after(marker: str, language: str) -> str:
    """The first ```language block after `marker` in the README."""
    start = README.index(marker)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(README, start)
    return match.group(1)


def defaults_block(section: str) -> dict:
    """The YAML block of "Every field, with its default" in a README section."""
    return yaml.safe_load(block_after(section, "yaml"))


def plain(value):
    """A default as YAML writes it: tuples are lists."""
    return [plain(v) for v in value] if isinstance(value, tuple) else value


def section_type(hint) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), or None for a plain value or a list."""
    if typing.get_origin(hint) is tuple:
        return None
    options = typing.get_args(hint) or (hint,)
    return next((o for o in options if dataclasses.is_dataclass(o)), None)


def field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def differences(cls: type, shown: dict, where: str = "", defaults=None) -> list[str]:
    """Where the README's fields of `cls` differ from its dataclass: missing or unknown fields,
    and defaults it gives wrongly (those of `defaults`, an instance, when the enclosing dataclass
    sets this section's default). Required fields show an example value, not compared."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    found = [f"{where}{name}: not a field" for name in sorted(set(shown) - set(fields))]
    found += [f"{where}{name}: not shown" for name in sorted(set(fields) - set(shown))]
    for name, f in fields.items():
        if name not in shown:
            continue
        default = field_default(f) if defaults is None else getattr(defaults, name)
        section = section_type(hints[name])
        if section is not None:
            given = default if dataclasses.is_dataclass(default) else None
            found += differences(section, shown[name], f"{where}{name}.", given)
        elif default is not dataclasses.MISSING and plain(default) != shown[name]:
            found.append(f"{where}{name}: README {shown[name]!r}, code {plain(default)!r}")
    return found


def test_readme_job_spec_defaults_are_the_code_defaults():
    assert differences(JobSpec, defaults_block("## Job specs")) == []


def test_readme_suite_defaults_are_the_code_defaults():
    assert differences(Suite, defaults_block("## Evaluation")) == []


def test_the_comparison_sees_a_drifted_default():
    shown = defaults_block("## Evaluation")
    shown["runtime"]["batch_size"] = 64
    del shown["safety"]
    shown["bootstrap"]["resamples"] = 100
    assert differences(Suite, shown) == [
        "safety: not shown",
        "bootstrap.resamples: not a field",
        "runtime.batch_size: README 64, code 32",
    ]


def test_readme_python_example_runs(tmp_path, monkeypatch, ray_address, capsys):
    """Run as written, from a folder that has the checkout's jobs/ and eval/ (with a home of its
    own, for the reference cache), on the session's Ray instance."""
    for folder in ("jobs", "eval"):
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    example = block_after("## Python API", "python")
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip().endswith("out/shapes/report/index.html")
    assert (tmp_path / "out" / "shapes" / "report" / "index.html").is_file()
    configs = (tmp_path / "out" / "shapes" / "metrics" / "configs.csv").read_text().splitlines()
    assert len(configs) == 1 + 2  # a header and the two guidance scales


@pytest.mark.parametrize("path", ["README.md", "jobs/README.md", "eval/README.md"])
def test_readmes_name_modules_that_exist(path):
    for module in re.findall(r"python -m (sdbatch[\w.]*)", (REPO / path).read_text()):
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
