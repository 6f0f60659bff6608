"""Image-conditioned tasks (img2img, inpaint, outpaint, depth2img) end to end on real local Ray:
builtin:toy, and a 5-channel depth-to-image model with random weights built here."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, job
from PIL import Image
from test_generate import keys, kill_once, read, sdbatch

from sdbatch.builtin import builtin_path
from sdbatch.generation import generate
from sdbatch.spec import parse_spec
from sdbatch.toy.world import BACKGROUND, SCENES, Scene, render

# A red circle's image under "a blue circle", a green square's under "a yellow square", ...
EDITS = [
    (Scene("circle", "red", "large", "center"), "blue"),
    (Scene("square", "green", "large", "left"), "yellow"),
    (Scene("triangle", "blue", "large", "right"), "red"),
    (Scene("circle", "yellow", "small", "center"), "green"),
]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene_maps(scene: Scene, seed: int, size: int = 32) -> tuple[Image.Image, ...]:
    """A scene's image, its object's mask (white) and a depth map (the silhouette, brighter for
    a larger object)."""
    image = render(scene, seed, size)
    area = np.abs(np.asarray(image, int) - BACKGROUND).sum(-1) > 30
    near = 255 if scene.size == "large" else 128
    mask = Image.fromarray((area * 255).astype(np.uint8))
    return image, mask, Image.fromarray((area * near).astype(np.uint8))


def task_prompts(path: Path, count: int = 4, size: int = 32, edit: bool = True) -> Path:
    """A prompt file of edits (or, `edit` False, of each source's own caption): prompt, image,
    mask, depth (image structs) and source_prompt."""
    rows = []
    for i in range(count):
        scene, color = EDITS[i % len(EDITS)]
        image, mask, depth = scene_maps(scene, seed=i, size=size)
        rows.append(
            {
                "prompt": scene.caption.replace(scene.color, color if edit else scene.color),
                "image": {"bytes": png(image), "path": f"scene-{i}.png"},
                "mask": {"bytes": png(mask), "path": None},
                "depth": {"bytes": png(depth), "path": None},
                "source_prompt": scene.caption,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def depth_model(folder: Path) -> Path:
    """A StableDiffusionDepth2ImgPipeline folder: builtin:toy's parts with a 5-channel UNet of
    random weights under a fixed seed, and no depth estimator (its rows give depth maps)."""
    import torch
    from diffusers import UNet2DConditionModel

    shutil.copytree(builtin_path("toy"), folder)
    config = UNet2DConditionModel.load_config(folder / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 5})
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("safety_checker", "image_encoder", "requires_safety_checker"):
        del index[name]
    index |= {"_class_name": "StableDiffusionDepth2ImgPipeline", "depth_estimator": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="session")
def depth_folder(tmp_path_factory):
    return depth_model(tmp_path_factory.mktemp("depth") / "model")


def task_job(prompts: Path, task: str, **sweep) -> dict:
    """A small job of `task` on builtin:toy over `prompts` (task_prompts' columns)."""
    columns = {"image_column": "image", "source_prompt_column": "source_prompt"}
    columns |= {"inpaint": {"mask_column": "mask"}, "depth2img": {"depth_column": "depth"}}.get(
        task, {}
    )
    settings = {"outpaint": {"outpaint": [{"right": 16}, {"top": 8, "left": 8}]}}.get(
        task, {"strength": [0.5, 1.0]}
    )
    return job(
        prompts,
        model="builtin:toy",
        task=task,
        prompts={"path": str(prompts), **columns},
        sweep={
            "scheduler": ["ddim"],
            "num_inference_steps": [4],
            "guidance_scale": [3.0],
            "images_per_prompt": 2,
            **settings,
            **sweep,
        },
    )


def decoded(cell) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])))


@pytest.mark.parametrize("task", ["img2img", "inpaint", "outpaint", "depth2img"])
def test_each_task_runs_end_to_end(task, tmp_path, depth_folder, ray_address):
    prompts = task_prompts(tmp_path / "edits.parquet")
    data = task_job(prompts, task)
    if task == "depth2img":
        data["model"] = str(depth_folder)
    out = tmp_path / "out"
    summary = generate(parse_spec(data), output=str(out), address=ray_address)
    assert summary.new_images == summary.total_images == 4 * 2 * 2
    rows = read(out)
    assert len(set(keys(rows))) == len(rows) == 16

    # sources.parquet: a row per prompt, the source as the pipeline got it, and its hash
    sources = {r["prompt_id"]: r for r in pq.read_table(out / "sources.parquet").to_pylist()}
    assert len(sources) == 4
    source_table = pq.read_table(prompts).to_pylist()
    for source, given in zip(sources.values(), source_table, strict=True):
        assert np.array_equal(decoded(source["image"]), decoded(given["image"]))
        assert source["source_prompt"] == given["source_prompt"]
        assert (source["mask"] is not None) == (task == "inpaint")
        assert (source["depth"] is not None) == (task == "depth2img")
    for row in rows:
        source = sources[row["source_id"]]
        assert row["source_id"] == row["prompt_id"] and row["task"] == task
        assert row["source_sha256"] == source["source_sha256"]
        assert row["source_sha256"].startswith("sha256:")
        width, height = Image.open(io.BytesIO(row["image"]["bytes"])).size
        assert (row["height"], row["width"]) == (height, width)
        if task == "outpaint":
            assert row["strength"] is None and row["outpaint"] in ("t0-r16-b0-l0", "t8-r0-b0-l8")
            assert (height, width) == ((32, 48) if row["outpaint"] == "t0-r16-b0-l0" else (40, 40))
            assert f"-outpaint-{row['outpaint']}-" in row["config_id"]
        else:
            assert row["outpaint"] is None and row["strength"] in (0.5, 1.0)
            assert (height, width) == (32, 32)
            assert f"-{task}-str{row['strength']:g}-" in row["config_id"]
    run = json.loads((out / "run.json").read_text())
    assert {c["task"] for c in run["configs"]} == {task}


def test_low_strength_stays_near_the_source(tmp_path, ray_address):
    """Under the source's own caption (builtin:toy recolors even at low strength when asked to),
    a few denoising steps from the lightly noised source stay near it; all of them do not."""
    prompts = task_prompts(tmp_path / "captions.parquet", edit=False)
    data = task_job(prompts, "img2img", strength=[0.2, 1.0], num_inference_steps=[10])
    out = tmp_path / "out"
    generate(parse_spec(data), output=str(out), address=ray_address)
    sources = {r["prompt_id"]: r for r in pq.read_table(out / "sources.parquet").to_pylist()}
    distance = {0.2: [], 1.0: []}
    for row in read(out):
        source = decoded(sources[row["prompt_id"]]["image"]).astype(int)
        distance[row["strength"]].append(np.abs(decoded(row["image"]).astype(int) - source).mean())
    low, high = np.mean(distance[0.2]), np.mean(distance[1.0])
    # builtin:toy's autoencoder alone is ~4 of 255 off
    assert low < 10 and low < 0.7 * high, (low, high)


def test_a_text_to_image_run_feeds_an_img2img_run(tmp_path, ray_address):
    """The first run's images/ folder is the second's prompt file, its `image` column the
    source: sdbatch's own output format, read as it is written."""
    texts = [scene.caption for scene in SCENES[:3]]
    pq.write_table(pa.table({"prompt": texts}), tmp_path / "prompts.parquet")
    first = job(
        tmp_path / "prompts.parquet",
        model="builtin:toy",
        sweep={"scheduler": ["ddim"], "num_inference_steps": [4], "guidance_scale": [3.0]},
    )
    first["sweep"]["images_per_prompt"] = 1
    generate(parse_spec(first), output=str(tmp_path / "text2img"), address=ray_address)
    made = read(tmp_path / "text2img")

    second = task_job(tmp_path / "text2img" / "images", "img2img", strength=[0.6])
    second["prompts"] = {"path": str(tmp_path / "text2img" / "images"), "image_column": "image"}
    out = tmp_path / "img2img"
    generate(parse_spec(second), output=str(out), address=ray_address)
    rows = read(out)
    assert len(rows) == 3 * 2
    by_prompt = {r["prompt"]: r for r in made}
    sources = {r["prompt_id"]: r for r in pq.read_table(out / "sources.parquet").to_pylist()}
    for row in rows:
        source = sources[row["source_id"]]
        # the text-to-image image, pixel for pixel, was the source
        assert np.array_equal(decoded(source["image"]), decoded(by_prompt[row["prompt"]]["image"]))

    # extended by a strength: the sources match, and only the new configuration is made
    second["sweep"]["strength"] = [0.6, 0.9]
    summary = generate(parse_spec(second), output=str(out), address=ray_address)
    assert summary.new_images == 3 * 2 and len(set(keys(read(out)))) == 3 * 2 * 2


def test_resume_after_the_driver_is_killed(tmp_path, spec_file, ray_address, refused):
    prompts = task_prompts(tmp_path / "edits.parquet", count=4)
    data = task_job(prompts, "inpaint", strength=[0.5, 1.0])
    data["runtime"] = {"batch_size": 1, "shard_size": 1}
    path = spec_file(data)
    output = tmp_path / "killed"
    driver = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    markers = output / "_units"
    kill_once(driver, lambda: len(list(markers.glob("*.json")) if markers.exists() else []) >= 2)
    units = 4 * 2
    done = len(list(markers.glob("*.json")))
    assert 2 <= done < units, "the kill should land mid-job"
    sources = (output / "sources.parquet").read_bytes()

    rerun = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resuming: {done * 2} images done" in err
    rows = read(output)
    assert len(rows) == 4 * 2 * 2 and len(set(keys(rows))) == len(rows)
    assert (output / "sources.parquet").read_bytes() == sources

    # a source image changed since: the output holds another job
    other = render(Scene("square", "green", "small", "left"), seed=9)
    table = pq.read_table(prompts).to_pylist()
    table[2]["image"] = {"bytes": png(other), "path": None}
    pq.write_table(pa.Table.from_pylist(table), prompts)
    import diffusers.pipelines.auto_pipeline  # noqa: F401 (its import is not the check's cost)

    error = refused("generate", path, "--out", output, "--dry-run")
    assert error.startswith(f"--out: {output} holds a different job (1 source image(s)"), error
    assert "first '000002-" in error


@pytest.mark.slow
@pytest.mark.parametrize("task", ["img2img", "outpaint", "depth2img"])
def test_a_shipped_task_job_resumes_after_the_driver_is_killed(
    task, tmp_path, spec_file, ray_address
):
    """jobs/TASK.yaml on its shipped models and prompt file, cut short (4 prompts, 10 steps, a
    unit per prompt): a rerun after a SIGKILL makes what is left, every row once. depth2img
    leaves the depth column out, so builtin:toy-depth's own depth estimator runs."""
    data = yaml.safe_load((REPO / "jobs" / f"{task}.yaml").read_text())
    data["prompts"] |= {"path": str(REPO / "jobs" / data["prompts"]["path"]), "limit": 4}
    if task == "depth2img":
        data["prompts"]["depth_column"] = None
    del data["suite"], data["output"]
    # 10 steps: img2img's strength 0.1 needs them to denoise at all
    data["sweep"] |= {"num_inference_steps": [10], "images_per_prompt": 1}
    data["runtime"] = {"batch_size": 1, "shard_size": 1}
    spec = parse_spec(data)
    units = 4 * spec.sweep.configurations * len(spec.models)
    path = spec_file(data)
    output = tmp_path / "killed"
    driver = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    markers = output / "_units"
    kill_once(driver, lambda: len(list(markers.glob("*.json")) if markers.exists() else []) >= 2)
    done = len(list(markers.glob("*.json")))
    assert 2 <= done < units, "the kill should land mid-job"

    rerun = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resuming: {done} images done" in err
    rows = read(output)
    assert len(rows) == units and len(set(keys(rows))) == len(rows)
    assert {r["task"] for r in rows} == {task}
    if task == "depth2img":
        assert all(
            s["depth"] is None for s in pq.read_table(output / "sources.parquet").to_pylist()
        )
