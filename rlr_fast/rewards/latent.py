"""An image reward as the latent reward `estimate` takes: `reward_fn(x0_latents) -> (B,)`.

The VAE decode is where a reward update peaks in memory (memory_budget.md: ~2.9 GiB of
activations per 512 px sample in the decoder backward). So the latents are decoded `decode_chunk`
samples at a time, each chunk under non-reentrant activation checkpointing: the forward keeps only
each chunk's latents, and the backward recomputes one chunk's decoder activations at a time.
Peak = the reward's own graph + one chunk of decoder activations, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from .base import Reward, check_prompts, get_reward


class LatentReward:
    """`reward_fn(x0_latents (B, C, h, w)) -> (B,)`: decode with `vae`, map to [0, 1], score against `prompts`.

    `differentiable` follows the image reward's. Without a gradient to compute (grad mode off, no
    input or VAE parameter requiring grad, or a non-differentiable reward) the decode runs under
    no_grad, still in chunks.
    """

    def __init__(self, vae: torch.nn.Module, reward: Union[str, Callable, Reward], prompts: Sequence[str], *,
                 decode_chunk: int = 1, checkpoint_vae: bool = True, scaling_factor: Optional[float] = None):
        if not callable(getattr(vae, "decode", None)):
            raise TypeError(f"vae must be a diffusers AutoencoderKL-like module with .decode, got {type(vae).__name__}")
        if isinstance(decode_chunk, bool) or not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive int (samples per VAE decode), got {decode_chunk!r}")
        config = getattr(vae, "config", None)
        if scaling_factor is None:
            scaling_factor = getattr(config, "scaling_factor", None)
            if scaling_factor is None:
                raise ValueError("the vae has no config.scaling_factor; pass scaling_factor= (SD1.x: 0.18215)")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor!r}")
        self.vae = vae
        self.reward = get_reward(reward)
        self.prompts = check_prompts(prompts, len(prompts))
        self.decode_chunk = decode_chunk
        self.checkpoint_vae = bool(checkpoint_vae)
        self.scaling_factor = float(scaling_factor)
        # Latent shift of SD3/Flux-style VAEs (absent or None for SD1.x/2.x).
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = getattr(config, "latent_channels", None)

    @property
    def differentiable(self) -> bool:
        return self.reward.differentiable

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 (N, 3, H, W), of latents (N, C, h, w) in the diffusion model's scale."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(vae_dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _needs_graph(self, latents: torch.Tensor) -> bool:
        if not (torch.is_grad_enabled() and self.reward.differentiable):
            return False
        return latents.requires_grad or any(p.requires_grad for p in self.vae.parameters())

    def __call__(self, x0_latents: torch.Tensor) -> torch.Tensor:
        self._check(x0_latents, "(B, C, h, w)")
        return self.reward(self.images(x0_latents), self.prompts)

    def _check(self, x0_latents: torch.Tensor, layout: str) -> None:
        if not torch.is_tensor(x0_latents) or x0_latents.dim() != len(layout.split(",")):
            raise ValueError(f"x0_latents must be a {layout} tensor, got "
                             f"{tuple(x0_latents.shape) if torch.is_tensor(x0_latents) else type(x0_latents).__name__}")
        if self.latent_channels is not None and x0_latents.shape[1] != self.latent_channels:
            raise ValueError(f"x0_latents has {x0_latents.shape[1]} channels, the vae expects {self.latent_channels}")
        if x0_latents.shape[0] != len(self.prompts):
            raise ValueError(f"x0_latents holds {x0_latents.shape[0]} samples but {len(self.prompts)} prompts "
                             "were given")

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` of latents (N, C, h, w), `decode_chunk` at a time, each chunk checkpointed when a
        gradient is to flow (`checkpoint_vae`); under no_grad when none is."""
        chunks = latents.split(self.decode_chunk)
        if not self._needs_graph(latents):
            with torch.no_grad():
                return torch.cat([self.decode(chunk) for chunk in chunks])
        if self.checkpoint_vae:
            return torch.cat([checkpoint(self.decode, chunk, use_reentrant=False) for chunk in chunks])
        return torch.cat([self.decode(chunk) for chunk in chunks])

    def __repr__(self) -> str:
        return (f"LatentReward({self.reward!r}, batch={len(self.prompts)}, decode_chunk={self.decode_chunk}, "
                f"checkpoint_vae={self.checkpoint_vae})")


def latent_reward(vae: torch.nn.Module, reward: Union[str, Callable, Reward], prompts: Sequence[str], *,
                  decode_chunk: int = 1, checkpoint_vae: bool = True,
                  scaling_factor: Optional[float] = None) -> LatentReward:
    """`reward_fn(x0_latents) -> (B,)` for `rlr_fast.estimate`, from an image reward (name, Reward or callable).

    Latents are divided by `scaling_factor` (default `vae.config.scaling_factor`), decoded
    `decode_chunk` samples per VAE call (each call checkpointed when `checkpoint_vae`), mapped from
    [-1, 1] to [0, 1] with a clamp, and scored against `prompts` (one per sample).
    """
    return LatentReward(vae, reward, prompts, decode_chunk=decode_chunk, checkpoint_vae=checkpoint_vae,
                        scaling_factor=scaling_factor)
