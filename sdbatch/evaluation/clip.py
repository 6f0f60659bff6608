"""CLIP in a worker: the suite's CLIP model embeds images and prompts, for CLIP score and for the
`clip` feature extractor, loaded once through `from_pretrained` (safetensors only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdbatch.models import ModelSource
from sdbatch.typed_data import conform, require


@dataclass(frozen=True)
class ClipSettings:
    """The CLIP model behind CLIP score and the `clip` feature extractor (a suite's `clip:`)."""

    model: str = "openai/clip-vit-large-patch14"
    revision: str | None = None

    def __post_init__(self) -> None:
        conform(self)
        require(self.model.strip() != "", "model", "must name a hub id or a local folder")


class ClipEncoder:
    """A CLIP model and its processors, loaded once through `from_pretrained` (safetensors only).

    Prompts longer than CLIP's context are truncated to it, keeping the end-of-text token whose
    embedding CLIP pools (slicing the token ids instead would drop it); each is counted.
    """

    def __init__(self, source: ModelSource, device: str):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        kwargs = {"revision": source.revision}
        self.model = CLIPModel.from_pretrained(source.location, use_safetensors=True, **kwargs)
        self.model = self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        # The PIL backend on every machine: torchvision's resize differs slightly, and a score
        # must not depend on which optional package a worker has.
        self.image_processor = AutoImageProcessor.from_pretrained(
            source.location, backend="pil", **kwargs
        )
        self.context = self.model.config.text_config.max_position_embeddings
        self.device = device
        self._texts: dict[str, tuple[np.ndarray, bool]] = {}

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        """The images' CLIP embeddings."""
        return self.embed_pixels(self.pixels(images))

    def pixels(self, images: list[np.ndarray]) -> Any:
        """The images as CLIP's processor prepares them (a tensor on the CPU); thread-safe
        beside `embed_pixels`, so a worker prepares the next batch while the model runs."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def embed_pixels(self, pixels: Any) -> np.ndarray:
        """The CLIP embeddings of images prepared by `pixels`."""
        return _tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Text embeddings, and which texts were truncated (each distinct text encoded once)."""
        new = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if new:
            lengths = [len(ids) for ids in self.tokenizer(new, verbose=False)["input_ids"]]
            tokens = self.tokenizer(
                new, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
            ).to(self.device)
            embedded = _tensor(self.model.get_text_features(**tokens))
            for text, row, length in zip(new, embedded, lengths, strict=True):
                self._texts[text] = (row, length > self.context)
        rows = [self._texts[t] for t in texts]
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])


def _tensor(output: Any) -> np.ndarray:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    embedded = output if hasattr(output, "float") else output.pooler_output
    return embedded.detach().float().cpu().numpy()
