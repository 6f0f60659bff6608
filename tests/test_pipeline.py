"""Model references: builtin, local folders and hub ids, resolved and pinned before any work."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import CLIPTokenizer

from sdbatch.builtin import build_tiny, build_tiny_clip, builtin_path
from sdbatch.errors import InputError
from sdbatch.pipeline import load_pipeline, resolve_model, weights_digest


@pytest.mark.parametrize(("name", "build"), [("tiny", build_tiny), ("tiny-clip", build_tiny_clip)])
def test_shipped_tiny_models_are_what_their_builders_make(tmp_path, name, build):
    build(tmp_path / name)
    assert weights_digest(tmp_path / name) == weights_digest(builtin_path(name))


def test_builtin_loads_through_from_pretrained_with_its_own_tokenizer():
    pipe = load_pipeline(resolve_model("builtin:tiny"), "fp32", "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.dtype == torch.float32
    ids = pipe.tokenizer("naïve café").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    long = pipe.tokenizer("x" * 200, truncation=True, max_length=77).input_ids
    assert len(long) == 77


def test_local_folder_identity_follows_its_files(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(builtin_path("tiny"), folder)
    source = resolve_model(str(folder))
    assert source.location == str(folder) and source.revision is None
    assert source.identity == resolve_model("builtin:tiny").identity
    (folder / "unet" / "config.json").write_text(
        (folder / "unet" / "config.json")
        .read_text()
        .replace('"act_fn": "silu"', '"act_fn": "gelu"')
    )
    assert resolve_model(str(folder)).identity != source.identity


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("builtin:huge", "unknown builtin model 'huge'; known: tiny"),
        ("./no/such/folder", "no folder './no/such/folder'"),
        ("not a hub id!", "not a hub id like org/name"),
    ],
)
def test_bad_model_references(ref, message):
    with pytest.raises(InputError, match=f"^model: .*{message}"):
        resolve_model(ref)


def test_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        resolve_model(str(tmp_path))


def test_hub_id_missing_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="cannot find 'nobody/nothing' on the Hugging Face hub"):
        resolve_model("nobody/nothing")
