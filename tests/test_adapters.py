"""Models and LoRA adapters as sweep axes: resolution and checks before Ray, a worker that keeps
its model and switches adapters by weight, memory, and runs on Ray that resume and extend."""

from __future__ import annotations

import gc
import io
import json
import re
import shutil
import weakref

import numpy as np
import pandas as pd
import psutil
import pyarrow.dataset as pads
import pytest
import torch
from conftest import REPO, job
from PIL import Image
from test_generate import kill_once, sdbatch

from sdbatch.builtin import builtin_path
from sdbatch.errors import InputError
from sdbatch.generation import generate
from sdbatch.lease import acquire
from sdbatch.models import resolve_model
from sdbatch.output import Output
from sdbatch.records import RunRecord
from sdbatch.spec import Adapter, Sweep, load_spec, parse_spec
from sdbatch.sweep import configurations, plan_units
from sdbatch.worker import GenerationSetup, Worker

TOY = resolve_model("builtin:toy")
TINY = resolve_model("builtin:tiny")


def write_lora(folder, model: str = "toy", seed: int = 0):
    """A LoRA for a builtin model in diffusers' format, as its training scripts save one: peft
    layers on the UNet's attention and the text encoder, with random (not zero) up factors, so
    that it changes images."""
    import diffusers
    import transformers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    path = builtin_path(model)
    unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    text = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v", "to_out.0"]), unet)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), text)
    layers = {}
    for name, module in (("unet_lora_layers", unet), ("text_encoder_lora_layers", text)):
        for key, p in module.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(p, std=0.2)
        layers[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    diffusers.StableDiffusionPipeline.save_lora_weights(str(folder), **layers)
    return folder


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_lora(tmp_path_factory.mktemp("lora"))


def worker_for(output, models=(TOY,), adapters=()) -> Worker:
    from sdbatch.adapters import resolve_adapter

    out = Output(str(output))
    holder = acquire(out.fs, out.root)
    sources = tuple(resolve_adapter(str(a), "test") for a in adapters)
    return Worker(
        GenerationSetup(tuple(models), "fp32", str(output), holder.run_id, 2, 1, adapters=sources)
    )


def units(sweep: Sweep, models=("builtin:toy",), texts=("a red circle in the center",)):
    table = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(texts))],
            "prompt": list(texts),
            "negative_prompt": pd.Series([None] * len(texts), dtype=object),
        }
    )
    return plan_units(table, configurations(sweep, models), 1, seed=3, shard_size=len(texts))


def small(lora=(None,), **fields) -> Sweep:
    return Sweep(
        scheduler=("euler",), num_inference_steps=(2,), guidance_scale=(1.0,), height=32, width=32,
        lora=lora, **fields,
    )  # fmt: skip


def images_of(worker: Worker, unit) -> list[np.ndarray]:
    *_, marker = worker.run(unit)
    rows = pads.dataset(str(worker.setup.output) + "/" + marker.file).to_table().to_pylist()
    return [np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))) for r in rows], rows


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_scale_zero_and_no_adapter_give_the_base_models_pixels(lora, tmp_path):
    torch.set_num_threads(1)
    sweep = small(lora=(None, Adapter(str(lora), (0.0, 1.0))))
    plain, zero, full = units(sweep)
    base = worker_for(tmp_path / "base")
    adapted = worker_for(tmp_path / "adapted", adapters=(lora,))
    weights = adapted.pipe.unet.conv_in.weight.data_ptr()
    (expected,), _ = images_of(base, plain)
    (at_one,), rows = images_of(adapted, full)
    (at_zero,), _ = images_of(adapted, zero)
    (without,), _ = images_of(adapted, plain)  # after the adapter was on: disabled again
    assert np.array_equal(at_zero, expected) and np.array_equal(without, expected)
    assert np.abs(at_one.astype(int) - expected).mean() > 1, "the adapter changes the image"
    (again,), _ = images_of(adapted, full)
    assert np.array_equal(again, at_one), "enabled again after being disabled"
    assert adapted.adapter_loads == 1 and adapted.model_loads == 1
    assert adapted.pipe.unet.conv_in.weight.data_ptr() == weights, "base weights reloaded"
    (row,) = rows
    assert (row["model"], row["lora"], row["lora_scale"]) == ("builtin:toy", str(lora), 1.0)
    assert row["model_identity"] == TOY.identity and row["lora_identity"].startswith("sha256:")


def test_loading_a_second_adapter_leaves_the_first_as_it_was(lora, tmp_path):
    """Both adapters live in one model (transformers reports the first one's weights as
    "missing" while it loads the second): each still gives the images it gives alone."""
    torch.set_num_threads(1)
    second = write_lora(tmp_path / "second", seed=1)
    sweep = small(lora=(Adapter(str(lora), (1.0,)), Adapter(str(second), (1.0,))))
    first_unit, second_unit = units(sweep)
    both = worker_for(tmp_path / "both", adapters=(lora, second))
    (before,), _ = images_of(both, first_unit)
    (with_second,), _ = images_of(both, second_unit)
    (after,), _ = images_of(both, first_unit)
    alone = worker_for(tmp_path / "alone", adapters=(second,))
    (second_alone,), _ = images_of(alone, units(small(lora=sweep.lora[1:]))[0])
    assert np.array_equal(before, after) and np.array_equal(with_second, second_alone)
    assert not np.array_equal(before, with_second)


def test_memory_stays_flat_over_many_adapter_switches(lora, tmp_path):
    torch.set_num_threads(1)
    second = write_lora(tmp_path / "second", seed=1)
    sweep = small(lora=(None, Adapter(str(lora), (0.5, 1.0)), Adapter(str(second), (1.0,))))
    todo = units(sweep)
    worker = worker_for(tmp_path / "out", adapters=(lora, second))
    for unit in todo[:2]:
        images_of(worker, unit)
    after_two = rss()
    for i in range(48):
        images_of(worker, todo[i % len(todo)])
    after_fifty = rss()
    assert worker.adapter_loads == 2
    assert after_fifty < after_two * 1.03, f"{after_two / 2**20:.0f} -> {after_fifty / 2**20:.0f}"


def test_switching_model_frees_the_previous_one(tmp_path):
    torch.set_num_threads(1)
    todo = units(small(), models=("builtin:toy", "builtin:tiny"))
    worker = worker_for(tmp_path / "out", models=(TOY, TINY))
    images_of(worker, todo[0])
    toy = weakref.ref(worker.pipe.unet)
    images_of(worker, todo[1])
    assert worker.model == "builtin:tiny" and toy() is None, "the previous model is still held"
    images_of(worker, todo[0])
    after_two = rss()
    for i in range(10):
        images_of(worker, todo[i % 2])
    after = rss()
    assert worker.model_loads == 12  # the first, then every switch
    assert after < after_two * 1.03, f"{after_two / 2**20:.0f} -> {after / 2**20:.0f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_switching_model_returns_gpu_memory_to_its_level(tmp_path):
    todo = units(small(), models=("builtin:toy", "builtin:tiny"))
    worker = worker_for(tmp_path / "out", models=(TOY, TINY))
    images_of(worker, todo[0])
    level = torch.cuda.memory_allocated()
    for unit in (todo[1], todo[0], todo[1], todo[0]):
        images_of(worker, unit)
    assert worker.model_loads == 5 and torch.cuda.memory_allocated() == level


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no file or folder"),
        ("pickle", "is not a .safetensors file"),
        ("empty", "holds no .safetensors file"),
        ("pickled", "holds only pickled weights (pytorch_lora_weights.bin)"),
        ("two", "holds several .safetensors files (a.safetensors, b.safetensors)"),
        ("garbage", "is not a readable safetensors file"),
        ("not-lora", "is not in diffusers' LoRA format"),
        ("builtin", "unknown builtin adapter 'nope'"),
        ("other-model", "does not fit model builtin:tiny: text_encoder."),
    ],
)
def test_a_bad_adapter_is_one_line_before_ray(
    case, message, lora, tmp_path, prompt_file, spec_file, refused
):
    import diffusers

    diffusers.UNet2DConditionModel  # noqa: B018 imported up front: not what the check costs
    folder = tmp_path / "adapter"
    folder.mkdir()
    path = {"missing": tmp_path / "nope", "builtin": "builtin:nope"}.get(case, folder)
    if case == "pickle":
        path = folder / "lora.bin"
        path.write_bytes(b"x")
    elif case == "pickled":
        (folder / "pytorch_lora_weights.bin").write_bytes(b"x")
    elif case == "two":
        for name in ("a", "b"):
            (folder / f"{name}.safetensors").write_bytes(b"x")
    elif case == "garbage":
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\xff" * 64)
    elif case == "not-lora":
        path = builtin_path("toy") / "unet" / "diffusion_pytorch_model.safetensors"
    elif case == "other-model":
        path = lora
    models = ["builtin:toy", "builtin:tiny"] if case == "other-model" else "builtin:toy"
    adapters = [None, {"path": str(path), "scale": [0.5, 1]}]
    spec = spec_file(job(prompt_file(), model=models, sweep={"lora": adapters}))
    out = tmp_path / "out"
    err = refused("generate", spec, "--out", out)
    assert err.startswith("sweep.lora[1].path: ") and message in err, err
    assert not out.exists()


def test_two_models_and_adapter_scales_on_ray_resume_after_a_kill(
    lora, tmp_path, prompt_file, spec_file, ray_address
):
    """Two models x (no adapter + an adapter at two scales) x two schedulers on 2 actors: a
    killed driver's rerun ends with every row once, each model loaded about once per actor."""
    sweep = {
        "scheduler": ["ddim", "euler"],
        "guidance_scale": [1.0],
        "images_per_prompt": 1,
        "lora": [None, {"path": str(lora), "scale": [0.5, 1.0]}],
    }
    data = job(
        prompt_file(),
        model=["builtin:toy", str(builtin_path("toy"))],
        sweep=sweep,
        runtime={"actors": 2, "batch_size": 2, "shard_size": 1},
    )
    path = spec_file(data)
    output = tmp_path / "out"
    driver = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    markers = output / "_units"
    kill_once(driver, lambda: len(list(markers.glob("*.json")) if markers.exists() else []) >= 3)
    done = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.json")}
    summary = generate(parse_spec(data), output=str(output), address=ray_address)
    configs = 2 * 3 * 2
    assert summary.total_images == 6 * configs and summary.new_images == 6 * configs - len(done)
    assert all(
        p.stat().st_mtime_ns == done[p.name] for p in markers.glob("*.json") if p.name in done
    )
    rows = pads.dataset(str(output / "images")).to_table().to_pandas()
    assert len(rows) == 6 * configs
    assert not rows.duplicated(["prompt_id", "sample_index", "config_id"]).any()
    assert rows.groupby(["model", "lora", "lora_scale"], dropna=False).size().tolist() == [12] * 6
    record = RunRecord.from_json((output / "run.json").read_bytes())
    assert [m.ref for m in record.models] == data["model"]
    assert [a.ref for a in record.adapters] == [str(lora)]
    (last,) = record.history[-1:]
    loads = [w["model_loads"] for w in last.workers]
    assert len(loads) == 2 and sum(loads) <= 3, loads  # max(2 models, 2 actors), and one move
    assert all(w["adapter_loads"] <= w["model_loads"] for w in last.workers)


def test_extension_with_a_new_model_and_adapter_keeps_every_id(tmp_path, prompt_file, ray_address):
    lora = write_lora(tmp_path / "lora")
    prompts = prompt_file()
    output = str(tmp_path / "out")
    sweep = {"scheduler": ["ddim"], "guidance_scale": [7.5], "images_per_prompt": 1}
    first = job(prompts, model="builtin:toy", sweep=sweep)
    generate(parse_spec(first), output=output, address=ray_address)
    (before,) = json.loads((tmp_path / "out" / "run.json").read_text())["configs"]
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "_units").iterdir()}

    # a model listed first now, and an adapter: the run's first model keeps its ids
    copy = str(builtin_path("toy"))
    lora_sweep = {**sweep, "lora": [None, {"path": str(lora), "scale": 1.0}]}
    wider = job(prompts, model=[copy, "builtin:toy"], sweep=lora_sweep)
    summary = generate(parse_spec(wider), output=output, address=ray_address)
    assert summary.new_images == 3 * 6
    after = json.loads((tmp_path / "out" / "run.json").read_text())["configs"]
    assert before["config_id"] in {c["config_id"] for c in after} and len(after) == 4
    assert all((tmp_path / "out" / "_units" / n).stat().st_mtime_ns == t for n, t in done.items())
    rows = pads.dataset(output + "/images").to_table().to_pandas()
    assert len(rows) == 24 and not rows.duplicated(["prompt_id", "config_id"]).any()
    assert rows.groupby("model").size().to_dict() == {copy: 12, "builtin:toy": 12}

    # an adapter retrained in place is another adapter: its images here are not its own
    write_lora(lora, seed=1)
    with pytest.raises(
        InputError, match=rf"different job \(adapter {re.escape(str(lora))}: sha256:"
    ):
        generate(parse_spec(wider), output=output, address=ray_address)


def test_the_adapters_job_sweeps_two_models_and_four_adapter_settings():
    spec = load_spec(REPO / "jobs" / "adapters.yaml")
    configs = configurations(spec.sweep, spec.models)
    assert len(configs) == 2 * 4 * 2 and len({c.config_id for c in configs}) == 16
    assert spec.baseline_setting == ("builtin:toy", None, None)
    assert {c.lora_scale for c in configs} == {None, 0.25, 0.5, 1.0}


def test_units_go_to_actors_holding_their_model_and_move_only_when_work_would_wait():
    from collections import deque

    from sdbatch.distribute import _least_served, _next_unit

    def model(unit):
        return unit[0]

    pending = deque((m, i) for i in range(6) for m in "ab")
    holds: dict[int, str] = {}
    for actor in (0, 1):  # actors start on different models
        holds[actor] = _least_served(pending, model, holds)
    assert holds == {0: "a", 1: "b"}
    taken: dict[int, list] = {0: [], 1: []}
    for _ in range(5):
        for actor in (0, 1):
            taken[actor].append(_next_unit(pending, actor, model, holds))
    assert {model(u) for u in taken[0]} == {"a"} and {model(u) for u in taken[1]} == {"b"}
    # actor 0 ran out of "a" units: the last "b" unit has its actor, so 0 waits rather than load b
    assert _next_unit(pending, 0, model, holds) == ("a", 5)
    assert _next_unit(pending, 0, model, holds) is None and holds[0] == "a"
    # several "b" units would wait for actor 1: actor 0 moves to b
    pending.extend(("b", i) for i in range(6, 9))
    assert _next_unit(pending, 0, model, holds) == ("b", 5) and holds[0] == "b"


def test_a_hub_adapter_loads_from_the_offline_cache(lora, tmp_path, prompt_file, spec_file):
    """A hub id pinned to its commit on the driver and loaded by the worker from the HF cache
    with HF_HUB_OFFLINE=1 (own local Ray)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sdbatch--toy-lora-test"
    shutil.copytree(lora, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sweep = {"scheduler": ["ddim"], "guidance_scale": [7.5], "images_per_prompt": 1}
    sweep["lora"] = [{"path": "sdbatch/toy-lora-test", "scale": 1.0}]
    data = job(prompt_file(["a red circle", "a blue square"]), model="builtin:toy", sweep=sweep)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = sdbatch("generate", str(spec_file(data)), "--out", str(tmp_path / "out"), env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    name = "pytorch_lora_weights.safetensors"
    identity = f"hub:sdbatch/toy-lora-test@{commit}/{name}"
    record = RunRecord.from_json((tmp_path / "out" / "run.json").read_bytes())
    assert [a.identity for a in record.adapters] == [identity]
    rows = pads.dataset(str(tmp_path / "out" / "images")).to_table().to_pandas()
    assert len(rows) == 2 and set(rows["lora_identity"]) == {identity}


def test_the_builtin_adapter_resolves_and_fits_its_base_only():
    from sdbatch.adapters import check_fits, resolve_adapter

    purple = resolve_adapter("builtin:toy-purple", "sweep.lora[1].path")
    check_fits(purple, TOY, "sweep.lora[1].path", {})
    with pytest.raises(InputError, match="builtin:toy-purple does not fit model builtin:tiny"):
        check_fits(purple, TINY, "sweep.lora[1].path", {})
