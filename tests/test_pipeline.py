"""Model references: builtin, local folders and hub ids, resolved and pinned before any work."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import torch
from conftest import LONG_PROMPT, PROMPTS, job
from transformers import CLIPTokenizer

from sdbatch.builtin import builtin_path
from sdbatch.cli import main
from sdbatch.digests import folder_digest
from sdbatch.errors import InputError
from sdbatch.generation import generate
from sdbatch.models import load_pipeline, longer_than_context, resolve_model
from sdbatch.spec import parse_spec
from sdbatch.toy.build import build_tiny, build_tiny_clip


@pytest.mark.parametrize(("name", "build"), [("tiny", build_tiny), ("tiny-clip", build_tiny_clip)])
def test_shipped_tiny_models_are_what_their_builders_make(tmp_path, name, build):
    build(tmp_path / name)
    assert folder_digest(tmp_path / name) == folder_digest(builtin_path(name))


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


T2I = r" \(model_index\.json\); sdbatch needs a text-to-image pipeline"


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (None, "no folder"),
        ("", r"is not a diffusers pipeline folder \(no model_index\.json\)"),
        (
            '{"_class_name": "StableDiffusionImg2ImgPipeline"}',
            "a StableDiffusionImg2ImgPipeline" + T2I,
        ),
        (
            '{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}',
            "DDPMPipeline" + T2I,
        ),
        ('{"unet": ["diffusers", "UNet2DConditionModel"]}', "holds no _class_name" + T2I),
        ('{"_class_name": "StableDiffusionPipeline",', "model_index.json is not valid JSON"),
    ],
)
def test_a_model_that_is_no_text_to_image_pipeline_exits_2(
    tmp_path, prompt_file, spec_file, capsys, index, message
):
    """A missing folder, one without model_index.json, or one naming another kind of pipeline."""
    folder = tmp_path / "model"
    if index is not None:
        shutil.copytree(builtin_path("tiny"), folder)
        (folder / "model_index.json").unlink()
    if index:
        (folder / "model_index.json").write_text(index)
    out = tmp_path / "out"
    path = spec_file(job(prompt_file(), model=str(folder)))
    assert main(["generate", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdbatch: error: model: ") and err.count("\n") == 1, err
    assert re.search(message, err) and str(folder) in err
    assert not out.exists()


def test_prompts_longer_than_the_tokenizer_takes(tmp_path, parti):
    """PartiPrompts holds prompts past builtin:tiny's 77 (byte) tokens: found from the tokenizer
    alone, as the loaded pipeline's own tokenizer would cut them."""
    assert main(["prompts", str(parti), "-o", str(tmp_path / "parti.parquet")]) == 0
    texts = [*pd.read_parquet(tmp_path / "parti.parquet")["prompt"], LONG_PROMPT]
    model = resolve_model("builtin:tiny")
    long = longer_than_context(model, texts)
    tokenizer = load_pipeline(model, "fp32", "cpu").tokenizer
    cut = {t for t in texts if len(tokenizer(t, verbose=False).input_ids) > 77}
    assert long == cut and LONG_PROMPT in long and 0 < len(long) < len(texts) - 1


def test_a_second_tokenizer_counts_too(tmp_path):
    """SDXL-shaped pipelines have tokenizer_2; a text too long for either one is cut."""
    folder = tmp_path / "model"
    shutil.copytree(builtin_path("tiny"), folder)
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2")
    config = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(
        json.dumps({**config, "model_max_length": 20})
    )
    index = json.loads((folder / "model_index.json").read_text())
    texts = ["a cat", "a" * 30, "a" * 80]
    for tokenizer_2, long in [([None, None], {"a" * 80}), (index["tokenizer"], set(texts[1:]))]:
        (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer_2": tokenizer_2}))
        assert longer_than_context(resolve_model(str(folder)), texts) == long


def test_a_damaged_tokenizer_exits_2(tmp_path, prompt_file, spec_file, capsys):
    folder = tmp_path / "model"
    shutil.copytree(builtin_path("tiny"), folder)
    (folder / "tokenizer" / "tokenizer.json").write_text("{")
    path = spec_file(job(prompt_file(), model=str(folder)))
    assert main(["generate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdbatch: error: model: cannot load {folder}'s tokenizer (Expecting")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_hub_id_missing_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="cannot find 'nobody/nothing' on the Hugging Face hub"):
        resolve_model("nobody/nothing")


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """builtin:tiny saved with safe_serialization=False: the UNet and VAE as .bin pickles
    (transformers 5 writes the text encoder as safetensors whatever it is asked)."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("pickled") / "model"
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path("tiny"))
    pipe.save_pretrained(folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    return folder


def test_pickled_weights_are_refused_unless_the_spec_opts_in(
    pickled, tmp_path, prompt_file, ray_address
):
    sweep = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
    data = job(prompt_file(PROMPTS[:2]), model=str(pickled), sweep=sweep)
    # refused on the driver, in one line, before Ray starts or anything is written
    with pytest.raises(InputError) as error:
        generate(parse_spec(data), output=str(tmp_path / "refused"), address=ray_address)
    message = str(error.value)
    assert message.startswith(f"model: {pickled} has weights that are not safetensors (unet, vae)")
    assert message.endswith("or set model_allow_pickle: true") and "\n" not in message
    assert not (tmp_path / "refused").exists()

    summary = generate(
        parse_spec({**data, "model_allow_pickle": True}),
        output=str(tmp_path / "out"),
        address=ray_address,
    )
    assert summary.new_images == 4
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["spec"]["model_allow_pickle"] is True and run["model"]["allow_pickle"] is True
    # the pickles are what loads, so they are part of the model's identity
    copy = tmp_path / "copy"
    shutil.copytree(pickled, copy)
    with (copy / "vae" / "diffusion_pytorch_model.bin").open("ab") as f:
        f.write(b"\0")
    assert resolve_model(str(copy), allow_pickle=True).identity != run["model"]["identity"]


EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\nclass Evil: pass\n"


@pytest.mark.parametrize(
    ("module", "entry", "message"),
    [
        ("evil_pipeline.py", "_class_name", "asks for a custom pipeline class"),
        ("unet/evil_unet.py", "unet", "loads component 'unet' from 'evil_unet'"),
    ],
)
def test_a_model_asking_for_its_own_code_is_refused_before_any_import(
    module, entry, message, tmp_path, prompt_file
):
    folder = tmp_path / "model"
    shutil.copytree(builtin_path("tiny"), folder)
    marker = tmp_path / "imported"
    (folder / module).write_text(EVIL.format(marker=str(marker)))
    index = json.loads((folder / "model_index.json").read_text())
    # how diffusers names a module of the model's own: [module file, class]
    index[entry] = [module.rsplit("/", 1)[-1].removesuffix(".py"), "Evil"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=f"^model: {re.escape(str(folder))} {message}.*never runs"):
        generate(parse_spec(job(prompt_file(), model=str(folder))), output=str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_hub_model_asking_for_its_own_code_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sdbatch--custom"
    shutil.copytree(builtin_path("tiny"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    index = repo / "snapshots" / commit / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "vae": ["my_vae", "MyVAE"]}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InputError, match=r"^model: sdbatch/custom loads component 'vae'"):
        resolve_model("sdbatch/custom")
    # the model itself, unchanged, resolves
    index.write_text((builtin_path("tiny") / "model_index.json").read_text())
    assert resolve_model("sdbatch/custom").identity == f"hub:sdbatch/custom@{commit}"
