"""A tiny user feature extractor, named in suites as `module:tiny_features:TinyFeatures`."""

from __future__ import annotations

import torch


class TinyFeatures(torch.nn.Module):
    """uint8 N x 3 x H x W -> N x 12: a fixed random projection of 4x4 average-pooled pixels."""

    num_features = 12

    def __init__(self):
        super().__init__()
        weights = torch.randn(12, 3 * 4 * 4, generator=torch.Generator().manual_seed(0))
        self.register_buffer("projection", weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4)
        return pooled.flatten(1) @ self.projection.T


class RandomFeatures(TinyFeatures):
    """Draws new weights on every construction: workers would disagree with the driver."""

    def __init__(self):
        super().__init__()
        self.projection = torch.randn(12, 3 * 4 * 4)
