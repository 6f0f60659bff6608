"""Train `builtin:toy-purple`: a LoRA adapter that teaches `builtin:toy` purple, the one color of
the shapes world its training data never showed, as Dreambooth teaches a model a new concept
(Ruiz et al. 2023, "DreamBooth", with its prior-preservation loss).

peft's LoRA on the UNet's attention projections (self- and cross-attention: to_q, to_k, to_v,
to_out.0), the base frozen, trained with the noise-prediction loss on two halves of each batch:
rendered purple scenes, and images the frozen base model draws for its own 72 captions (the prior:
what the adapter should leave as it was). Saved in diffusers' LoRA format
(`pytorch_lora_weights.safetensors`), which `pipe.load_lora_weights(folder)` reads.

Not solved yet: the adapter does not draw purple. builtin:toy's autoencoder, trained on the four
base colors, encodes and decodes a purple circle as a green one, and no latent found against its
decoder comes out purer than blue-violet; attention LoRA cannot add a color the decoder lacks.

Reproduce the shipped adapter (from a fixed seed, bit for bit on the same torch and CPU):
    python -m sdbatch.toy.build toy-purple
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from sdbatch.builtin import builtin_path
from sdbatch.schedulers import make_scheduler
from sdbatch.toy import world
from sdbatch.toy.train import THREADS, denoising_loss, image_tensors

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# The base's prior images are drawn as the demo draws its best-judged ones: with euler, as the
# pipeline's own default (PNDM) draws builtin:toy's images badly.
PRIOR_SCHEDULER, PRIOR_GUIDANCE = "euler", 4.0


def train_toy_purple(
    destination: Path,
    base: Path | None = None,
    steps: int = 300,
    seed: int = 0,
    batch: int = 32,
    instances: int = 360,
    priors_per_scene: int = 2,
    prior_steps: int = 20,
    rank: int = 4,
    learning_rate: float = 3e-3,
) -> None:
    """Train the purple adapter for `base` (default `builtin:toy`) and save it into `destination`.

    Args:
        steps: optimizer steps; each sees `batch` purple images and `batch` prior images.
        instances: rendered purple (image, caption) pairs, over the 18 purple scenes.
        priors_per_scene: images the base draws for each of its 72 scenes, in `prior_steps`.
        rank: LoRA rank (alpha equals it, so the adapter's scale 1 is its trained strength).
    """
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    pipe = StableDiffusionPipeline.from_pretrained(
        base or builtin_path("toy"), use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)

    def encode(pixels):
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor

    # 1. the prior: images the frozen base draws for each of its captions, 8-bit as if saved,
    #    encoded like training images (its latents as sampled lie off the encoder's: the base's
    #    noise-prediction loss on them was 30x that on encoded ones)
    pipe.scheduler = make_scheduler(PRIOR_SCHEDULER, pipe.scheduler.config)
    prior_captions = [s.caption for s in world.SCENES for _ in range(priors_per_scene)]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prior_captions))]
    with torch.no_grad():
        drawn = pipe(
            prior_captions,
            num_inference_steps=prior_steps,
            guidance_scale=PRIOR_GUIDANCE,
            height=world.SIZE,
            width=world.SIZE,
            generator=generators,
            output_type="np",
        ).images
        prior = encode(torch.from_numpy(np.round(drawn * 255) / 127.5 - 1).permute(0, 3, 1, 2))

    # 2. the new concept: rendered purple scenes, encoded like the base's training images
    pixels, captions = image_tensors(instances, seed, world.PURPLE_SCENES)
    with torch.no_grad():
        latents = encode(pixels)
        texts = ["", *sorted(set(captions) | set(prior_captions))]
        states, _ = pipe.encode_prompt(texts, "cpu", 1, do_classifier_free_guidance=False)
    caption_ids = torch.tensor([texts.index(c) for c in captions])
    prior_ids = torch.tensor([texts.index(c) for c in prior_captions])

    # 3. LoRA on the UNet's attention; B starts at zero, so training starts from the base
    torch.manual_seed(seed)
    unet = pipe.unet
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES
    )
    unet.add_adapter(config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    for _ in tqdm(range(steps), desc="toy-purple", unit="step"):
        rows = torch.randint(0, len(latents), (batch,), generator=generator)
        prior_rows = torch.randint(0, len(prior), (batch,), generator=generator)
        clean = torch.cat([latents[rows], prior[prior_rows]])
        ids = torch.cat([caption_ids[rows], prior_ids[prior_rows]])
        # Dreambooth's loss, new concept's plus prior's with weight 1: halves of equal size
        loss = denoising_loss(unet, noise_scheduler, clean, ids, states, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.eval()
    torch.set_num_threads(threads)

    # 4. save in diffusers' LoRA format
    if destination.exists():
        shutil.rmtree(destination)
    StableDiffusionPipeline.save_lora_weights(
        destination,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )
