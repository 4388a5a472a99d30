"""JPEG (in)compressibility, the weight-free rewards of DDPO (Black et al. 2023).

Each image is quantised to 8 bits and encoded by PIL as JPEG at quality 95; the reward is the
file size in kB (1 kB = 1000 bytes), negated for compressibility. Encoding is not differentiable,
so these rewards return values with no gradient path: use them with likelihood-ratio estimators
(or the likelihood-ratio part of RLR) only.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward, register_reward

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """(B,) float32 JPEG sizes in kB of float images in [0, 1], shape (B, 3, H, W), on their device."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for pixel_array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixel_array)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Minus the JPEG size in kB: smaller files (flatter, simpler images) score higher."""

    differentiable = False

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_size_kb(images)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """The JPEG size in kB: larger files (more detail and texture) score higher."""

    differentiable = False

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_size_kb(images)
