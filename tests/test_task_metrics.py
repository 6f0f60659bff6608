"""Metrics of image-conditioned runs: PSNR and SSIM where the source should be kept, and CLIP
directional similarity, each against an independent computation; and eval over an output with
sources.parquet (built here as the tasks' generation writes it), or refusing them without one."""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sdbatch.evaluation.metrics.directional import directional_similarity
from sdbatch.evaluation.metrics.psnr_ssim import MAX_PSNR, masked_psnr, masked_ssim
from sdbatch.evaluation.sources import SOURCES, outpaint_offset, row_sources

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
    assert masked_ssim(result, source, kept) == pytest.approx(ssim_map[kept].mean(), abs=1e-9)
    assert masked_ssim(result, source, None) == pytest.approx(ssim_map.mean(), abs=1e-9)
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

    def tensor(x):
        return torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)[None]

    ssim = structural_similarity_index_measure(tensor(result), tensor(source), data_range=255.0)
    psnr = peak_signal_noise_ratio(tensor(result), tensor(source), data_range=255.0)
    assert masked_ssim(result, source, everything) == pytest.approx(float(ssim), abs=1e-12)
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
    assert outpaint_offset("t0-r16-b8-l24") == (0, 24)
    with pytest.raises(ValueError, match="source_id p9"):
        row_sources(str(tmp_path / SOURCES), {**columns, "source_id": ["p9"] * 4})
