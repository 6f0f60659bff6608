"""Metrics of image-conditioned runs: PSNR and SSIM where the source should be kept, and CLIP
directional similarity, each against an independent computation; and eval over an output with
sources.parquet (built here as the tasks' generation writes it), or refusing them without one."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import job, suite_data
from PIL import Image

from sdbatch.evaluation.metrics.directional import directional_similarity
from sdbatch.evaluation.metrics.psnr_ssim import MAX_PSNR, masked_psnr, masked_ssim
from sdbatch.evaluation.sources import row_sources
from sdbatch.output import SOURCES
from sdbatch.spec import Expansion
from sdbatch.toy.world import Scene

RNG = np.random.default_rng(0)


def noisy(image: np.ndarray, amount: int, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def numpy_psnr(a: np.ndarray, b: np.ndarray, kept: np.ndarray | None) -> float:
    """10 log10(255² / MSE) over the kept pixels' values, by hand."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if kept is not None:
        a, b = a[kept], b[kept]
    return 10 * math.log10(255.0**2 / np.mean((a - b) ** 2))


def numpy_ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM per pixel (channels averaged), window by window: an 11 x 11 Gaussian of sigma 1.5
    around each pixel of the images reflected at their border (Wang et al. 2004, eq. 13)."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    height, width, channels = a.shape
    pad = [(5, 5), (5, 5), (0, 0)]
    x, y = (np.pad(v.astype(np.float64), pad, "reflect") for v in (a, b))
    out = np.zeros((height, width, channels))
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                px, py = x[i : i + 11, j : j + 11, c], y[i : i + 11, j : j + 11, c]
                mx, my = (window * px).sum(), (window * py).sum()
                vx = max((window * px * px).sum() - mx**2, 0.0)
                vy = max((window * py * py).sum() - my**2, 0.0)
                cov = (window * px * py).sum() - mx * my
                out[i, j, c] = ((2 * mx * my + c1) * (2 * cov + c2)) / (
                    (mx**2 + my**2 + c1) * (vx + vy + c2)
                )
    return out.mean(axis=2)


@pytest.mark.parametrize("shape", [(12, 16), (9, 20)])
def test_psnr_and_ssim_over_kept_pixels_match_direct_numpy(shape):
    source = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    result = noisy(source, 25)
    kept = RNG.random(shape) > 0.4
    assert masked_psnr(result, source, kept) == pytest.approx(numpy_psnr(result, source, kept))
    assert masked_psnr(result, source, None) == pytest.approx(numpy_psnr(result, source, None))
    ssim_map = numpy_ssim_map(result, source)
    assert masked_ssim(result, source, kept) == pytest.approx(ssim_map[kept].mean(), abs=1e-6)
    assert masked_ssim(result, source, None) == pytest.approx(ssim_map.mean(), abs=1e-6)
    # the mask matters: repainting the masked pixels lowers neither score where nothing is kept
    repainted = result.copy()
    repainted[~kept] = 255 - repainted[~kept]
    assert masked_psnr(repainted, source, kept) == masked_psnr(result, source, kept)
    assert masked_psnr(repainted, source, None) < masked_psnr(result, source, None)


def test_every_pixel_kept_is_torchmetrics_own_ssim_and_psnr():
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    source = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    result = noisy(source, 40)
    everything = np.ones((24, 24), bool)

    def tensor(x, dtype=np.float64):
        return torch.from_numpy(x.astype(dtype)).permute(2, 0, 1)[None]

    # float32, as masked_ssim computes it: the same numbers to rounding
    ssim = structural_similarity_index_measure(
        tensor(result, np.float32), tensor(source, np.float32), data_range=255.0
    )
    psnr = peak_signal_noise_ratio(tensor(result), tensor(source), data_range=255.0)
    assert masked_ssim(result, source, everything) == pytest.approx(float(ssim), abs=1e-6)
    assert masked_psnr(result, source, everything) == pytest.approx(float(psnr), abs=1e-9)


def test_identical_pixels_cap_psnr_and_nothing_kept_is_nan():
    source = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert masked_psnr(source, source, None) == MAX_PSNR
    assert masked_ssim(source, source, None) == pytest.approx(1.0)
    none = np.zeros((8, 8), bool)
    assert math.isnan(masked_psnr(noisy(source, 9), source, none))
    assert math.isnan(masked_ssim(noisy(source, 9), source, none))


def test_directional_similarity_matches_a_direct_computation():
    rows, dim = 7, 12
    results, sources, prompts, captions = (RNG.normal(size=(rows, dim)) * 3 for _ in range(4))
    got = directional_similarity(results, sources, prompts, captions)
    for i in range(rows):
        unit = [v / np.sqrt(v @ v) for v in (results[i], sources[i], prompts[i], captions[i])]
        image, text = unit[0] - unit[1], unit[2] - unit[3]
        assert got[i] == pytest.approx(image @ text / np.sqrt((image @ image) * (text @ text)))
    # an edit along the text's direction scores 1, against it -1; no change has no direction
    same = directional_similarity(prompts, captions, prompts, captions)
    assert same == pytest.approx(np.ones(rows))
    assert directional_similarity(captions, prompts, prompts, captions) == pytest.approx(-same)
    assert np.isnan(directional_similarity(sources, sources, prompts, captions)).all()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def cell(array: np.ndarray | None, path: str = "") -> dict | None:
    return None if array is None else {"bytes": png(array), "path": path}


def write_sources(path, rows: dict[str, tuple]) -> None:
    """sources.parquet as the contract has it: prompt_id -> (image, mask, source_prompt)."""
    table = pa.table({
        "prompt_id": list(rows),
        "image": [cell(image, f"{pid}.png") for pid, (image, _, _) in rows.items()],
        "mask": [cell(mask) for _, mask, _ in rows.values()],
        "depth": [None] * len(rows),
        "source_prompt": [caption for _, _, caption in rows.values()],
        "source_sha256": [
            "sha256:" + hashlib.sha256(png(image)).hexdigest() for image, _, _ in rows.values()
        ],
    })  # fmt: skip
    pq.write_table(table, path)


def test_rows_find_their_source_and_the_part_to_keep(tmp_path):
    image = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    mask = np.zeros((16, 24), np.uint8)
    mask[4:10, 6:18] = 255
    rows = {"p1": (image, mask, "a red circle"), "p2": (image, None, None)}
    write_sources(tmp_path / SOURCES, rows)
    columns = {
        "source_id": ["p1", "p1", "p2", None],
        "task": ["inpaint", "img2img", "outpaint", "text2img"],
        "outpaint": [None, None, "t8-r0-b0-l16", None],
    }
    inpaint, img2img, outpaint, none = row_sources(str(tmp_path / SOURCES), columns)
    assert none is None
    assert (inpaint.repaint == (mask == 255)).all() and img2img.repaint is None
    assert inpaint.prompt == "a red circle" and outpaint.prompt is None
    result = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    part, source, kept = inpaint.preserved(result)
    assert (part == result).all() and (source == image).all() and (kept == (mask == 0)).all()
    assert img2img.preserved(result)[2] is None
    extended = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    part, _, kept = outpaint.preserved(extended)
    assert (part == extended[8:24, 16:40]).all() and kept is None
    with pytest.raises(ValueError, match="does not fit the result 24x16"):
        outpaint.preserved(result)
    assert Expansion.parse("t0-r16-b8-l24") == Expansion(0, 16, 8, 24)
    with pytest.raises(ValueError, match="source_id p9"):
        row_sources(str(tmp_path / SOURCES), {**columns, "source_id": ["p9"] * 4})


# The synthetic image-conditioned output: a real text2img run of builtin:tiny whose rows are
# rewritten as the tasks' generation writes them (the contract's columns, sources.parquet), one
# configuration per task, with results made from their sources so that preservation varies.
SCENES = [
    (Scene("circle", "blue", "large", "center"), Scene("circle", "red", "large", "center")),
    (Scene("square", "green", "small", "left"), Scene("square", "yellow", "small", "left")),
    (Scene("triangle", "red", "large", "right"), None),  # no source caption
]
TASKS = {  # per configuration, in the sweep's order (guidance 1, 4, 7.5)
    1.0: ("img2img", 0.3, None),
    4.0: ("inpaint", 0.6, None),
    7.5: ("outpaint", None, "t0-r8-b0-l0"),
}
MASK = (slice(8, 24), slice(6, 20))  # the repainted area of every inpaint source
SIDE = 32


def task_result(
    task: str, strength: float | None, source: np.ndarray, generated: np.ndarray, seed: int
) -> np.ndarray:
    """What a pipeline might have made: img2img the source changed everywhere, inpaint changed
    a little outside the mask and replaced inside, outpaint the source with 8 new columns; the
    more strength, the more change."""
    if task == "img2img":
        return noisy(source, round(200 * strength), seed)
    if task == "inpaint":
        result = noisy(source, round(10 * strength), seed)
        result[MASK] = generated[MASK]
        return result
    return np.concatenate([noisy(source, 6, seed), generated[:, :8]], axis=1)


def build_task_output(root, ray_address, tasks=TASKS):
    """Generate, then rewrite as an image-conditioned output, `tasks` giving each configuration
    (by its guidance) its task, strength and outpaint; returns (out, sources by id)."""
    from sdbatch.generation import generate
    from sdbatch.output import Output
    from sdbatch.spec import parse_spec
    from sdbatch.toy import world

    prompts = root / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [target.caption for target, _ in SCENES]}), prompts)
    out = root / "out"
    sweep = {"scheduler": ["ddim"], "guidance_scale": list(tasks), "images_per_prompt": 2}
    generate(parse_spec(job(prompts, sweep=sweep)), output=str(out), address=ray_address)
    output = Output(str(out))
    ids = output.read_prompts()["prompt_id"].tolist()
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[MASK] = 255
    sources = {
        pid: (np.asarray(world.render(target, seed=k, size=SIDE)), mask, source and source.caption)
        for k, (pid, (target, source)) in enumerate(zip(ids, SCENES, strict=True))
    }
    write_sources(out / SOURCES, sources)
    guidance = {c.config_id: c.guidance_scale for c in output.read_run().configs}
    for marker in output.done_units():
        path = out / marker.file
        rows = pq.read_table(path).to_pylist()
        for k, row in enumerate(rows):
            task, strength, outpaint = tasks[guidance[row["config_id"]]]
            source = sources[row["prompt_id"]][0]
            generated = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
            seed = hash((row["seed"], k)) % 2**32
            result = task_result(task, strength, source, generated, seed)
            row["image"]["bytes"] = png(result)
            row.update(task=task, strength=strength, outpaint=outpaint)
            row.update(source_id=row["prompt_id"], source_sha256=f"sha256:{row['prompt_id']}")
        pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(path)), path)
        body = path.read_bytes()
        marker = dataclasses.replace(
            marker, bytes=len(body), sha256=hashlib.sha256(body).hexdigest()
        )
        (out / "_units" / f"{marker.unit_id}.json").write_bytes(marker.to_json())
    return out, sources


TASK_METRICS = ["clip_score", "attribute_accuracy", "clip_directional", "psnr", "ssim", "fid"]


@pytest.fixture(scope="module")
def evaluated_tasks(tmp_path_factory, ray_address):
    from sdbatch.evaluation.run import evaluate
    from sdbatch.evaluation.suite import parse_suite
    from sdbatch.toy.world import write_reference

    root = tmp_path_factory.mktemp("tasks")
    out, sources = build_task_output(root, ray_address)
    reference = root / "reference.parquet"
    write_reference(str(reference), count=20, size=SIDE)
    data = suite_data(reference, root / "cache", metrics=TASK_METRICS)
    summary = evaluate(str(out), parse_suite(data), address=ray_address)
    return {"root": root, "out": out, "sources": sources, "summary": summary, "suite": data}


def test_eval_scores_each_image_against_its_own_source(evaluated_tasks):
    from sdbatch.evaluation.clip import ClipEncoder
    from sdbatch.models import CLIP, resolve_model

    out, sources = evaluated_tasks["out"], evaluated_tasks["sources"]
    scores = pd.read_parquet(out / "metrics" / "images.parquet")
    rows = pd.concat([pq.read_table(f).to_pandas() for f in (out / "images").glob("*.parquet")])
    rows = rows.merge(scores, on=["prompt_id", "sample_index", "config_id"])
    assert len(rows) == len(scores) == 3 * 3 * 2
    clip = ClipEncoder(resolve_model("builtin:tiny-clip", None, CLIP), "cpu")
    for row in rows.itertuples():
        result = np.asarray(Image.open(io.BytesIO(row.image["bytes"])).convert("RGB"))
        source, mask, caption = sources[row.source_id]
        part, kept = result, None
        if row.task == "inpaint":
            kept = mask == 0
        if row.task == "outpaint":  # t0-r8-b0-l0: the source is the result's left 32 columns
            part = result[:, :SIDE]
        assert row.psnr == pytest.approx(numpy_psnr(part, source, kept)), row.task
        ssim_map = numpy_ssim_map(part, source)
        expected = ssim_map.mean() if kept is None else ssim_map[kept].mean()
        # float32 (masked_ssim): flat areas' variances lose ~1e-4 to rounding
        assert row.ssim == pytest.approx(expected, abs=2e-4), row.task
        if caption is None:
            assert math.isnan(row.clip_directional)
        else:
            embedded = clip.embed_images([result, source])
            texts, _ = clip.embed_texts([row.prompt, caption])
            expected = directional_similarity(embedded[:1], embedded[1:], texts[:1], texts[1:])[0]
            assert row.clip_directional == pytest.approx(expected, abs=1e-5)
    # inpainting kept the unmasked area (noise of 6), img2img changed everything (noise of 60)
    by_task = rows.groupby("task")[["psnr", "ssim"]].mean()
    assert by_task.loc["inpaint", "psnr"] > by_task.loc["img2img", "psnr"] + 10
    assert by_task.loc["outpaint", "ssim"] > by_task.loc["img2img", "ssim"]


def test_configs_carry_the_task_and_the_metrics_with_intervals(evaluated_tasks):
    configs = pd.read_parquet(evaluated_tasks["out"] / "metrics" / "configs.parquet")
    for metric in ("psnr", "ssim", "clip_directional"):
        assert (configs[f"{metric}_low"] <= configs[metric]).all()
        assert (configs[metric] <= configs[f"{metric}_high"]).all()
    assert {"task", "strength", "outpaint"} <= set(configs.columns)
    columns = list(configs.columns)
    assert columns.index("lora_scale") + 1 == columns.index("task")


def test_a_suite_with_source_metrics_refuses_an_output_without_sources(
    evaluated_tasks, tmp_path, refused
):
    import shutil

    import yaml

    out = tmp_path / "text2img"
    shutil.copytree(evaluated_tasks["out"], out, ignore=shutil.ignore_patterns("metrics"))
    (out / SOURCES).unlink()
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(evaluated_tasks["suite"]))
    err = refused("eval", out, "--suite", suite)
    assert err.startswith("metrics: clip_directional compares images with their sources"), err
    assert not (out / "metrics").exists()


def test_a_text2img_job_with_source_metrics_is_refused_before_it_generates(
    evaluated_tasks, tmp_path, spec_file, refused
):
    import yaml

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(evaluated_tasks["suite"]))
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle"]}), prompts)
    out = tmp_path / "out"
    err = refused("run", spec_file(job(prompts)), "--suite", suite, "--out", out)
    assert err.startswith("metrics: clip_directional compares images with their sources, and the "
                          "job's task is text2img"), err  # fmt: skip
    assert not out.exists()
