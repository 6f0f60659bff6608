"""Image-conditioned tasks without Ray: bad input refused up front, the size and mask policy, config
ids, and a worker switching tasks and strengths on one loaded model."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_tasks import depth_model, png, scene_maps, task_job, task_prompts

from sdbatch.lease import acquire
from sdbatch.models import resolve_model
from sdbatch.output import Output
from sdbatch.prompts import load_prompts
from sdbatch.sources import fit, load_sources
from sdbatch.spec import load_spec, parse_spec
from sdbatch.sweep import Config, configurations, plan_units
from sdbatch.toy.world import SCENES
from sdbatch.worker import GenerationSetup, Worker


@pytest.fixture(scope="module", autouse=True)
def pipeline_tables():
    """diffusers' AutoPipeline tables, imported once up front: `refused` measures the check's
    own time and memory, not that import's."""
    import diffusers.pipelines.auto_pipeline  # noqa: F401


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    return depth_model(tmp_path_factory.mktemp("depth") / "model")


def edited(path, column: str, row: int, value) -> None:
    """Replace one cell of a prompt file."""
    table = pq.read_table(path).to_pylist()
    table[row][column] = value
    pq.write_table(pa.Table.from_pylist(table), path)


GREY_MASK = {"bytes": png(Image.new("L", (32, 32), 128)), "path": None}
SMALL_MASK = {"bytes": png(Image.new("L", (16, 16), 255)), "path": None}
FLAT_DEPTH = {"bytes": png(Image.new("L", (32, 32), 90)), "path": None}


DEPTH = {"model": "DEPTH"}
BAD_INPUTS = [
    ("img2img", {"prompts": {"image_column": "pic"}}, "prompts.image_column: no column 'pic'"),
    (
        "img2img",
        ("image", 2, {"bytes": b"not a PNG", "path": None}),
        "prompts.image_column: the image of prompt 000002-[0-9a-f]+ does not decode",
    ),
    ("img2img", ("image", 1, None), "prompts.image_column: the image of prompt 000001-.* missing"),
    (
        "img2img",
        ("image", 0, {"bytes": None, "path": "no/such.png"}),
        "prompts.image_column: the image of prompt 000000-.* does not decode",
    ),
    ("inpaint", ("mask", 3, SMALL_MASK), "prompts.mask_column: prompt 000003-.*'s mask is 16x16"),
    (
        "inpaint",
        ("mask", 0, GREY_MASK),
        r"prompts.mask_column: the mask of prompt 000000-.* is not binary \(1024 pixels between",
    ),
    ("img2img", {"sweep": {"strength": [0.5, 1.5]}}, r"sweep.strength\[1\]: must be in \(0, 1\]"),
    ("img2img", {"sweep": {"strength": [0.1]}}, "sweep.strength: 0.1 x 4 num_inference_steps"),
    ("outpaint", {"sweep": {"outpaint": [{"right": 12}]}}, r"sweep.outpaint\[0\].right: must be"),
    ("outpaint", {"sweep": {"outpaint": [{"left": 0}]}}, r"sweep.outpaint\[0\].top: adds no"),
    ("img2img", {"prompts": {"mask_column": "mask"}}, "prompts.mask_column: used by inpaint only"),
    ("outpaint", {"sweep": {"strength": [0.5]}}, "sweep.strength: used by img2img, inpaint and"),
    ("text2img", {"prompts": {"image_column": "image"}}, "prompts.image_column: used by img2img"),
    ("inpaint", {"prompts": {"mask_column": None}}, "prompts.mask_column: task inpaint needs it"),
    (
        "depth2img",
        {},
        "task: depth2img needs a StableDiffusionDepth2ImgPipeline with a 5-channel UNet .*; "
        r"model builtin:toy holds a StableDiffusionPipeline \(4-channel UNet\)",
    ),
    ("img2img", DEPTH, "task: img2img needs a text-to-image or image-to-image pipeline"),
    (
        "depth2img",
        {**DEPTH, "prompts": {"depth_column": None}},
        "prompts.depth_column: model .* has no depth estimator; give every prompt a depth map",
    ),
    (
        "depth2img",
        {**DEPTH, "change": ("depth", 1, FLAT_DEPTH)},
        "prompts.depth_column: the depth map of prompt 000001-.* is flat",
    ),
]


@pytest.mark.parametrize(("task", "change", "message"), BAD_INPUTS)
def test_bad_task_input_is_one_line_before_ray(
    task, change, message, tmp_path, spec_file, refused, depth_folder
):
    prompts = task_prompts(tmp_path / "edits.parquet")
    data = task_job(prompts, task) if task != "text2img" else task_job(prompts, "img2img")
    if task == "text2img":
        data["task"] = "text2img"
        data["prompts"] = {"path": str(prompts)}
        del data["sweep"]["strength"]
    if isinstance(change, dict):
        change = dict(change)
        edit = change.pop("change", None)
        if change.get("model") == "DEPTH":
            change["model"] = str(depth_folder)
        for key, value in change.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        data["prompts"] = {k: v for k, v in data["prompts"].items() if v is not None}
        change = edit
    if change:
        edited(prompts, *change)
    out = tmp_path / "out"
    error = refused("generate", spec_file(data), "--out", out)
    assert re.match(message, error), error
    assert not out.exists()


def test_size_policy_covers_then_center_crops():
    wide = Image.fromarray((np.arange(32 * 64 * 3) % 251).reshape(32, 64, 3).astype(np.uint8))
    # already (height, width): untouched, pixel for pixel
    assert fit(wide, 32, 64, Image.Resampling.BICUBIC) is wide
    # 64x32 into 32x32: no scaling needed to cover, the middle 32 columns kept
    square = fit(wide, 32, 32, Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(square), np.asarray(wide)[:, 16:48])
    # 64x32 into 48x48: scaled by 1.5 to 96x48, then the middle 48 columns
    scaled = fit(wide, 48, 48, Image.Resampling.BICUBIC)
    expected = wide.resize((96, 48), Image.Resampling.BICUBIC).crop((24, 0, 72, 48))
    assert scaled.size == (48, 48) and np.array_equal(np.asarray(scaled), np.asarray(expected))


def test_sources_are_read_from_paths_relative_to_the_prompt_file_and_sized(tmp_path):
    """A string column of paths beside the prompt file; a 48x40 source (and its mask) come out
    at 32x32 by the size policy, the mask still binary."""
    image, mask, _ = scene_maps(SCENES[0], seed=0, size=48)
    image, mask = image.crop((0, 4, 48, 44)), mask.crop((0, 4, 48, 44))
    (tmp_path / "pictures").mkdir()
    image.save(tmp_path / "pictures" / "a.png")
    mask.save(tmp_path / "pictures" / "a-mask.png")
    path = tmp_path / "edits.parquet"
    columns = {"image": ["pictures/a.png"], "mask": ["pictures/a-mask.png"]}
    pq.write_table(pa.table({"prompt": ["a blue circle"], **columns}), path)
    data = task_job(path, "inpaint")
    del data["prompts"]["source_prompt_column"]
    spec = parse_spec(data)
    prompts = load_prompts(spec.prompts)
    (source,) = load_sources(spec.prompts, prompts.sources, 32, 32).values()
    got = np.asarray(Image.open(io.BytesIO(source.image)))
    want = fit(image, 32, 32, Image.Resampling.BICUBIC)
    assert np.array_equal(got, np.asarray(want))
    grey = np.asarray(Image.open(io.BytesIO(source.mask)))
    assert grey.shape == (32, 32) and set(np.unique(grey)) == {0, 255}


# What main (before tasks) gives these specs' configurations: text2img ids never change.
MAIN_IDS = {
    "jobs/demo.yaml": "euler-s3-g1-11cc90 euler-s3-g2-fb4106 euler-s3-g4-ec1455 "
    "euler-s20-g1-4d47c2 euler-s20-g2-21fe0b euler-s20-g4-77a5f9 ddim-s3-g1-a9caa0 "
    "ddim-s3-g2-e42232 ddim-s3-g4-f68590 ddim-s20-g1-26b6a1 ddim-s20-g2-db014b ddim-s20-g4-f60e51",
    "jobs/adapters.yaml": "euler-s20-g2-21fe0b ddim-s20-g2-db014b euler-s20-g2-lora0.25-226373 "
    "ddim-s20-g2-lora0.25-ea2fe0 euler-s20-g2-lora0.5-3ac6dc ddim-s20-g2-lora0.5-395a50 "
    "euler-s20-g2-lora1-d7e59b ddim-s20-g2-lora1-9a23d0 euler-s20-g2-46ab8c ddim-s20-g2-e19852 "
    "euler-s20-g2-lora0.25-6d06a5 ddim-s20-g2-lora0.25-0e4a89 euler-s20-g2-lora0.5-f9765a "
    "ddim-s20-g2-lora0.5-747d32 euler-s20-g2-lora1-23ed14 ddim-s20-g2-lora1-143ca3",
}


@pytest.mark.parametrize("path", sorted(MAIN_IDS))
def test_text_to_image_config_ids_are_unchanged(path):
    spec = load_spec(path)
    ids = [c.config_id for c in configurations(spec.sweep, spec.models, task=spec.task)]
    assert ids == MAIN_IDS[path].split()


def test_task_config_ids_name_the_task_and_its_setting():
    sweep = parse_spec(task_job("p.parquet", "img2img", strength=[0.3, 0.6])).sweep
    img2img = [c.config_id for c in configurations(sweep, task="img2img")]
    assert [i.rsplit("-", 1)[0] for i in img2img] == [
        "ddim-s4-g3-img2img-str0.3",
        "ddim-s4-g3-img2img-str0.6",
    ]
    # the same grid point of another task is another configuration
    inpaint = [c.config_id for c in configurations(sweep, task="inpaint")]
    text2img = configurations(sweep)[0].config_id
    assert len({*img2img, *inpaint, text2img}) == 5
    outpaint = parse_spec(task_job("p.parquet", "outpaint")).sweep
    assert [c.config_id.rsplit("-", 1)[0] for c in configurations(outpaint, task="outpaint")] == [
        "ddim-s4-g3-outpaint-t0-r16-b0-l0",
        "ddim-s4-g3-outpaint-t8-r0-b0-l8",
    ]


def test_switching_task_or_strength_never_loads_weights(tmp_path, monkeypatch):
    """One loaded model runs text2img, img2img at two strengths, inpaint and outpaint: every task
    pipeline holds the very same modules, and nothing is loaded after the first model load."""
    import diffusers
    import transformers

    prompts = task_prompts(tmp_path / "edits.parquet", count=2)
    spec = parse_spec(task_job(prompts, "inpaint"))
    prompt_set = load_prompts(spec.prompts)
    sources = load_sources(spec.prompts, prompt_set.sources, 32, 32)
    out = Output(str(tmp_path / "out"))
    holder = acquire(out.fs, out.root)
    toy = resolve_model("builtin:toy")
    worker = Worker(GenerationSetup((toy,), "fp32", out.location, holder.run_id, 4, 1))
    loads = []
    for cls in (diffusers.ModelMixin, transformers.PreTrainedModel, diffusers.DiffusionPipeline):
        original = cls.from_pretrained.__func__
        monkeypatch.setattr(
            cls,
            "from_pretrained",
            classmethod(lambda c, *a, _f=original, **k: loads.append(c) or _f(c, *a, **k)),
        )
    base = Config("ddim", 2, 3.0, 32, 32, "", "builtin:toy")
    tasks = [
        base,
        dataclasses.replace(base, task="img2img", strength=0.5),
        dataclasses.replace(base, task="img2img", strength=1.0),
        dataclasses.replace(base, task="inpaint", strength=1.0),
        dataclasses.replace(base, task="outpaint", outpaint="t0-r8-b0-l0"),
    ]
    frame = prompt_set.frame
    for config in tasks:
        given = None if config.task == "text2img" else sources
        (unit,) = plan_units(frame, [config], 1, 0, 2, sources=given)
        *_, marker = worker.run(unit)
        assert marker.images == 2
    assert loads == [] and worker.model_loads == 1
    modules = ("unet", "vae", "text_encoder")
    for pipe in worker._pipes.values():
        assert all(getattr(pipe, m) is getattr(worker.pipe, m) for m in modules)
    assert {type(p).__name__ for p in worker._pipes.values()} == {
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    }
    rows = pd.concat(pq.read_table(out.path(m.file)).to_pandas() for m in out.done_units())
    assert sorted(rows["task"].unique()) == ["img2img", "inpaint", "outpaint", "text2img"]
