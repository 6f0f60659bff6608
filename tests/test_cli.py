"""The `sdbatch` console script: help, exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import job

from sdbatch.cli import main
from sdbatch.generation import MAX_UNCONFIRMED_IMAGES

SCRIPT = shutil.which("sdbatch", path=str(Path(sys.executable).parent)) or shutil.which("sdbatch")


@pytest.mark.parametrize("command", ["generate", "prompts", "demo", "status", "pull"])
def test_each_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"sdbatch {command}" in text


@pytest.mark.parametrize("command", ["generate", "run", "demo"])
def test_commands_that_generate_take_yes_and_say_the_limit(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--yes" in text and f"{MAX_UNCONFIRMED_IMAGES:,} images" in text


def test_console_script_exit_codes(tmp_path, prompt_file, spec_file):
    assert SCRIPT, "the sdbatch console script is not installed"
    usage = subprocess.run([SCRIPT], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: sdbatch" in usage.stderr
    bad = spec_file(job(prompt_file(), sweep={"num_inference_steps": [0]}))
    result = subprocess.run([SCRIPT, "generate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (
        "sdbatch: error: sweep.num_inference_steps[0]: must be between 1 and 1,000 "
        "(diffusers schedulers train on 1,000 timesteps), got 0\n"
    )
