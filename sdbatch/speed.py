"""The runtime's speed options on a loaded pipeline: attention, memory format, VAE slicing and
tiling, torch.compile. None of them changes which images are made; each worker records what it
applied (`Worker.describe`), as `auto` resolves by device and size.

Compiled graphs are specialised to their input shapes (`dynamic=False`), and the worker pads a
short last batch to its batch size, so each configuration's size compiles one graph for the UNet
and one for the VAE decoder; the first call at each shape (compile included) is a warm-up batch.
"""

from __future__ import annotations

from typing import Any

from sdbatch.errors import InputError
from sdbatch.spec import Runtime

# Above this side (px), `vae_tiling: auto` decodes in tiles: the decoder's last blocks run at full
# resolution, so its memory grows with the pixels and past SDXL's native size outgrows the UNet's.
VAE_TILING_SIDE = 1024
RECOMPILE_LIMIT = 64  # compiled shapes per model


def apply(pipe: Any, runtime: Runtime, device: str) -> dict[str, Any]:
    """Apply `runtime`'s options to a freshly loaded pipeline; returns what was applied.

    Raises:
        InputError: attention: eager on a model whose attention diffusers cannot reset (not a
            UNet and KL VAE, like SD 1.x, 2.x and SDXL).
    """
    import torch

    cuda = device == "cuda"
    # 1. attention: diffusers loads SDPA (AttnProcessor2_0) under torch 2; eager swaps it out
    if runtime.attention == "eager":
        for model in (pipe.unet, pipe.vae):
            try:
                model.set_default_attn_processor()
            except (AttributeError, ValueError) as e:
                raise InputError(
                    f"runtime.attention: eager needs diffusers' default attention processors, "
                    f"which {type(model).__name__} cannot take ({e}); use sdpa"
                ) from None
    # 2. memory format: NHWC convolutions run on tensor cores without transposes
    channels_last = cuda if runtime.channels_last == "auto" else runtime.channels_last
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    # 3. VAE slicing: the decode of a batch peaks at one image's memory, at the same pixels
    slicing = cuda if runtime.vae_slicing == "auto" else runtime.vae_slicing
    if slicing:
        pipe.vae.enable_slicing()
    # 4. compile last, so the graphs see the final modules
    mode = "default" if runtime.compile is True else runtime.compile or None
    if mode:
        # Each size x guidance passes x batch size of a sweep is a graph of its own; past dynamo's
        # default of 8 a model would run eager again, with nothing but a warning to say so.
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        pipe.unet.compile(mode=mode, dynamic=False)
        pipe.vae.decoder.compile(mode=mode, dynamic=False)
    return {
        "attention": runtime.attention,
        "channels_last": channels_last,
        "vae_slicing": slicing,
        "compile": mode,
    }


def tile_vae(pipe: Any, runtime: Runtime, size: tuple[int, int]) -> bool:
    """Switch the VAE's tiled decoding on or off for images of `size` (height, width); returns
    whether it is on."""
    tiled = max(size) > VAE_TILING_SIDE if runtime.vae_tiling == "auto" else runtime.vae_tiling
    if tiled:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    return tiled
