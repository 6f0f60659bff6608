"""The image dataset's row: every column of OUT/images/, with its Arrow type, and the key that
names one image. The worker's rows and the Parquet schema come from this one definition."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Annotated, Any

import pyarrow as pa

# (prompt_id, sample_index, config_id) is unique in a dataset: it joins images to their metrics.
KEY_COLUMNS = ("prompt_id", "sample_index", "config_id")
# `datasets` reads this schema metadata and decodes the struct column to PIL images.
HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}}}}


@dataclass(frozen=True)
class ImageRow:
    """One generated image and everything needed to make it again."""

    # {"bytes": the lossless PNG, "path": "CONFIG_ID/PROMPT_ID-SAMPLE.png"}: `datasets`' layout
    image: Annotated[dict[str, Any], pa.struct([("bytes", pa.binary()), ("path", pa.string())])]
    prompt_id: Annotated[str, pa.string()]
    prompt: Annotated[str, pa.string()]
    negative_prompt: Annotated[str, pa.string()]
    sample_index: Annotated[int, pa.int32()]
    seed: Annotated[int, pa.int64()]  # torch.Generator().manual_seed(seed) reproduces the image
    config_id: Annotated[str, pa.string()]
    scheduler: Annotated[str, pa.string()]
    num_inference_steps: Annotated[int, pa.int32()]
    guidance_scale: Annotated[float, pa.float64()]
    height: Annotated[int, pa.int32()]
    width: Annotated[int, pa.int32()]
    model: Annotated[str, pa.string()]  # as the spec names it
    model_identity: Annotated[str, pa.string()]  # "sha256:..." or "hub:REPO@COMMIT"
    # The LoRA adapter as the spec names it, what exactly it is, and its scale; null without one
    lora: Annotated[str | None, pa.string()]
    lora_identity: Annotated[str | None, pa.string()]
    lora_scale: Annotated[float | None, pa.float64()]
    # text2img, img2img, inpaint, outpaint or depth2img, and the task's own setting: strength
    # (img2img, inpaint, depth2img) or the pixels outpainting added, "t0-r16-b0-l0"; else null
    task: Annotated[str, pa.string()]
    strength: Annotated[float | None, pa.float64()]
    outpaint: Annotated[str | None, pa.string()]
    # The prompt row whose image was the source (its prompt_id; its row in sources.parquet), and
    # "sha256:<hex>" of that image's pixels as the pipeline got it; null for text2img
    source_id: Annotated[str | None, pa.string()]
    source_sha256: Annotated[str | None, pa.string()]
    dtype: Annotated[str, pa.string()]
    batch_size: Annotated[int, pa.int32()]  # images in the pipeline call that made it
    generation_seconds: Annotated[float, pa.float64()]  # that call's time over its images
    # That call was its worker's first at its input shape: its time includes one-time costs.
    warmup: Annotated[bool, pa.bool_()]
    # The model's safety checker flagged the image (diffusers blacks such images out); None
    # where the model has no checker.
    nsfw_flagged: Annotated[bool | None, pa.bool_()]


IMAGE_SCHEMA = pa.schema(
    [
        (name, hint.__metadata__[0])
        for name, hint in typing.get_type_hints(ImageRow, include_extras=True).items()
    ],
    metadata={"huggingface": json.dumps(HF_FEATURES)},
)


def image_table(rows: list[ImageRow]) -> pa.Table:
    """The rows as an Arrow table with the dataset's schema."""
    names = IMAGE_SCHEMA.names
    return pa.Table.from_pylist([{n: getattr(r, n) for n in names} for r in rows], IMAGE_SCHEMA)
