"""Preservation, for image-conditioned runs: how much of its source an image keeps where it should
(`sdbatch.evaluation.sources`: inpaint outside the mask, outpaint the original canvas, img2img and
depth2img the whole image), by PSNR and SSIM between that part and the source, per image, with
torchmetrics' functional implementations on 0-255 pixel values. A configuration's score is the
mean over its images; images without a source are NaN and left out.

PSNR (in dB): 10 log10(255² / MSE) over the kept pixels and channels, computed by torchmetrics
on the kept values alone. Identical pixels would give infinity, which no mean survives: a
value is capped at `MAX_PSNR`.

SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural
similarity"), torchmetrics' defaults: an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01,
K2 = 0.03, the image reflected at its border. Masked: torchmetrics' SSIM map
(`return_full_image=True`, one value per pixel and channel) averaged over the kept pixels and the
channels; with every pixel kept this is torchmetrics' SSIM. A kept pixel's window reaches up to
5 pixels into the repainted area, so repainting lowers the SSIM of its unmasked neighbours too.

Cost: no model; per image PSNR one pass over its pixels, SSIM five 11 x 11 convolutions per
channel in float32 (on one busy CPU thread: 8 ms at 32 px, 0.5 s at 512 px; PSNR 19 ms at 512 px).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sdbatch.evaluation.metric import (
    PRESERVATION,
    ConfigGroup,
    Interval,
    Metric,
    Need,
    Score,
    UnitImages,
)

DATA_RANGE = 255.0
MAX_PSNR = 100.0  # dB; what identical pixels score


def _tensor(image: np.ndarray) -> Any:
    """H x W x 3 uint8 -> 1 x 3 x H x W float32: torch's CPU convolutions are ~8x slower in
    float64. SSIM moves by up to ~1e-4 (measured on world scenes): in flat areas a window's
    variance is a small difference of large squares."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None]


def masked_psnr(result: np.ndarray, source: np.ndarray, kept: np.ndarray | None) -> float:
    """PSNR (dB) of `result` against `source` (H x W x 3 uint8) over the `kept` pixels (H x W
    bool; None: all), capped at MAX_PSNR; NaN when no pixel is kept."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if kept is not None and not kept.any():
        return math.nan
    a, b = torch.from_numpy(result.astype(np.float64)), torch.from_numpy(source.astype(np.float64))
    if kept is not None:
        a, b = a[torch.from_numpy(kept)], b[torch.from_numpy(kept)]
    value = float(peak_signal_noise_ratio(a, b, data_range=DATA_RANGE))
    return min(value, MAX_PSNR)


def masked_ssim(result: np.ndarray, source: np.ndarray, kept: np.ndarray | None) -> float:
    """SSIM of `result` against `source` (H x W x 3 uint8): torchmetrics' map averaged over the
    `kept` pixels (H x W bool; None: all) and the channels; NaN when no pixel is kept."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if kept is not None and not kept.any():
        return math.nan
    _, full = structural_similarity_index_measure(
        _tensor(result), _tensor(source), data_range=DATA_RANGE, return_full_image=True
    )
    per_pixel = full[0].mean(dim=0).numpy()  # H x W: the channels' mean
    return float(per_pixel.mean() if kept is None else per_pixel[kept].mean())


def _scorer(name: str, score: Any) -> Any:
    def score_images(unit: UnitImages) -> dict[str, np.ndarray]:
        values = np.full(len(unit.images), np.nan)
        for i, (image, source) in enumerate(zip(unit.images, unit.made_from, strict=True)):
            if source is not None:
                values[i] = score(*source.preserved(image))
        return {name: values}

    return score_images


def _mean(name: str) -> Any:
    def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
        return group.mean(name)

    return aggregate


def _declare(name: str, label: str, score: Any, digits: int, least: float, most: float) -> Metric:
    return Metric(
        name=name,
        label=label,
        higher_is_better=True,
        judges=PRESERVATION,
        needs=frozenset({Need.SOURCES}),
        interval=Interval.PERCENTILE,
        aggregate=_mean(name),
        scores=(Score(name, label, digits=digits),),
        image_columns=(name,),
        score_images=_scorer(name, score),
        shard_token=name,
        least=least,
        most=most,
    )


PSNR = _declare("psnr", "PSNR to the source (dB)", masked_psnr, 2, 0.0, MAX_PSNR)
SSIM = _declare("ssim", "SSIM to the source", masked_ssim, 3, -1.0, 1.0)
