"""Weight-free differentiable rewards for the demo domain (`rlr_fast.demo_data`: coloured shapes).

`color_match` scores how well an image shows its prompt's colours: the shape colour in the image
centre and the background colour along the border. Demo shapes are drawn centred within the
middle 30% of the frame with a radius of 18-28% of its size, so a well-formed image has the
shape colour on the central box and the background on the outer ring. `brightness` is the
simplest differentiable reward there is, for tests and smoke runs.
"""

from __future__ import annotations

import torch

from .. import demo_data
from .base import Reward, register_reward

# Central box: the middle 20% of each side. Border ring: the outer 10% of each side.
CENTRE_FRACTION = 0.2
BORDER_FRACTION = 0.1


def _centre_slice(size: int) -> slice:
    start = int(size * (1 - CENTRE_FRACTION) / 2)
    return slice(start, max(start + 1, size - start))  # symmetric, at least one pixel


def _border_mask(height: int, width: int, device: torch.device) -> torch.Tensor:
    band_h = max(1, round(height * BORDER_FRACTION))
    band_w = max(1, round(width * BORDER_FRACTION))
    mask = torch.ones(height, width, dtype=torch.bool, device=device)
    mask[band_h:height - band_h, band_w:width - band_w] = False
    return mask


def _targets(names: list[str | None], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3) RGB targets in [0, 1] (zeros where unnamed) and a (B,) float mask of named ones."""
    rgb = [demo_data.COLORS[n] if n is not None else (0, 0, 0) for n in names]
    targets = torch.tensor(rgb, dtype=dtype, device=device) / 255
    named = torch.tensor([n is not None for n in names], dtype=dtype, device=device)
    return targets, named


@register_reward("color_match")
class ColorMatch(Reward):
    """Minus the mean squared RGB error to the prompt's colours, in [-1, 0] (0 = perfect match).

    Two terms, each a mean over pixels and channels of (pixel - target)^2 with RGB in [0, 1]: the
    central box against the shape colour, the border ring against the background colour. The
    reward averages the terms the prompt names ("a red circle" names no background, so only the
    centre counts); a prompt naming no colour at all is a ValueError. Quadratic in the pixels, so
    it is smooth and its gradient points straight at the target colours.
    """

    differentiable = True

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = [demo_data.parse_prompt(p) for p in prompts]
        unscorable = [p for p, parts in zip(prompts, parsed) if parts["color"] is None and parts["background"] is None]
        if unscorable:
            raise ValueError(f"color_match needs prompts naming a colour from {sorted(demo_data.COLORS)}, "
                             f"got {unscorable[0]!r}")
        images = images.to(torch.promote_types(images.dtype, torch.float32))  # half -> float32, keep float64
        shape_rgb, has_shape = _targets([p["color"] for p in parsed], images.device, images.dtype)
        background_rgb, has_background = _targets([p["background"] for p in parsed], images.device, images.dtype)

        height, width = images.shape[-2:]
        centre = images[:, :, _centre_slice(height), _centre_slice(width)]
        centre_error = (centre - shape_rgb[:, :, None, None]).square().mean(dim=(1, 2, 3))
        border = images[:, :, _border_mask(height, width, images.device)]  # (B, 3, pixels)
        border_error = (border - background_rgb[:, :, None]).square().mean(dim=(1, 2))

        total = has_shape * centre_error + has_background * border_error
        return -total / (has_shape + has_background)


@register_reward("brightness")
class Brightness(Reward):
    """The mean pixel value in [0, 1]: a trivially differentiable reward for tests and smoke runs."""

    differentiable = True

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.to(torch.promote_types(images.dtype, torch.float32)).mean(dim=(1, 2, 3))
