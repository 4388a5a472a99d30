"""The embedded default model: a tiny text-to-image Stable Diffusion that ships inside the package.

It draws 32x32 "a <colour> <shape> on a <colour> background" images (`rlr_fast.demo_data`), has
SD1.4's component types and DDIM schedule, and loads with the same `load_sd` as SD1.4, so the
whole fine-tuning path runs offline on a CPU in minutes. `scripts/train_default_model.py` made it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models import SDModels, load_sd
from .rollout import rollout


def default_model_path() -> Path:
    """The diffusers folder of the embedded default model."""
    return Path(__file__).resolve().parent / "assets" / "default_model"


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDModels:
    """The embedded default model, frozen and in eval mode (see `load_sd`)."""
    return load_sd(default_model_path(), dtype=dtype, device=device)


def latents_to_images(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode scaled latents (as the UNet sees them) to uint8 images (B, H, W, 3)."""
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def sample(models: SDModels, prompts: list[str], *, seed: int = 0, num_steps: int = 20, eta: float = 0.0,
           guidance_scale: float = 4.0) -> np.ndarray:
    """One image per prompt as uint8 (B, H, W, 3): a DDIM `rollout` with classifier-free guidance
    against the empty prompt (the model was trained with captions dropped to ""), then the VAE."""
    unet = models.unet
    generator = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    x_T = torch.randn((len(prompts), unet.config.in_channels, side, side), generator=generator)
    x_T = x_T.to(device=unet.device, dtype=unet.dtype)
    traj = rollout(unet, models.scheduler, x_T, num_steps=num_steps, eta=eta,
                   encoder_hidden_states=models.encode_prompts(prompts),
                   negative_encoder_hidden_states=models.encode_prompts([""] * len(prompts)),
                   guidance_scale=guidance_scale, generator=generator)
    return latents_to_images(models.vae, traj.x0)
