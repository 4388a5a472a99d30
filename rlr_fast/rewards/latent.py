"""An image reward as the latent reward `estimate` takes: `reward_fn(x0_latents) -> (B,)`.

The VAE decode is where a reward update peaks in memory (~2.9 GiB of activations per 512 px
SD1.4 sample in the decoder backward, fp16). With `checkpoint_vae` the latents are decoded
`decode_chunk` samples at a time, each chunk under non-reentrant activation checkpointing, and
inside it every resnet, attention and upsampling block of the decoder is checkpointed too: the
forward keeps only each chunk's latents, and the backward recomputes one chunk's decode keeping
only the block boundaries, then one block's activations at a time (1.07 GiB per SD1.4 sample in
fp16, against 2.85 GiB with the chunk checkpoint alone; meta-device estimates by rlr_fast.plan).
The decode costs two more forward passes.

The decode and the reward run outside autocast, in their own weights' dtype: under CUDA autocast
every group norm of the decoder would keep a float32 output, 1.57 GiB instead of 1.07 GiB per
SD1.4 sample with fp16 weights, and a reward network runs in the precision it was loaded in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from .base import Reward, check_prompts, get_reward
from .loading import CheckpointedForward


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
        """Images in [0, 1] (N, 3, H, W) of latents (N, C, h, w) in the diffusion model's scale: float32, or
        float64 from a float64 VAE (so a float64 run keeps its precision through the reward)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(vae_dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.to(torch.promote_types(images.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)

    def _needs_graph(self, latents: torch.Tensor) -> bool:
        if not (torch.is_grad_enabled() and self.reward.differentiable):
            return False
        return latents.requires_grad or any(p.requires_grad for p in self.vae.parameters())

    def __call__(self, x0_latents: torch.Tensor) -> torch.Tensor:
        self._check(x0_latents, "(B, C, h, w)")
        with autocast_off():
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
        """`decode` of latents (N, C, h, w), `decode_chunk` at a time, outside autocast; with a gradient
        to flow and `checkpoint_vae`, each chunk (and each decoder block inside it) is checkpointed;
        under no_grad when no gradient is to flow."""
        chunks = latents.split(self.decode_chunk)
        with autocast_off():
            if not self._needs_graph(latents):
                with torch.no_grad():
                    return torch.cat([self.decode(chunk) for chunk in chunks])
            if self.checkpoint_vae:
                return torch.cat([checkpoint(self._decode_by_blocks, chunk, use_reentrant=False) for chunk in chunks])
            return torch.cat([self.decode(chunk) for chunk in chunks])

    def _decode_by_blocks(self, latents: torch.Tensor) -> torch.Tensor:
        # Called again by the chunk's recomputation in the backward, which is when the block
        # checkpoints matter: that graph is the one back-propagated.
        with checkpoint_blocks(getattr(self.vae, "decoder", None)):
            return self.decode(latents)

    def __repr__(self) -> str:
        return (f"LatentReward({self.reward!r}, batch={len(self.prompts)}, decode_chunk={self.decode_chunk}, "
                f"checkpoint_vae={self.checkpoint_vae})")


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def checkpoint_blocks(decoder: Optional[torch.nn.Module]) -> Iterator[None]:
    """While active, each resnet, attention and upsampling block of a diffusers VAE `decoder` runs
    under non-reentrant activation checkpointing when a graph is built (a block's recomputation
    calls its own forward, so it needs nothing from this context later). None: nothing to do."""
    if decoder is None:
        yield
        return
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, Upsample2D

    blocks = [m for m in decoder.modules() if isinstance(m, (ResnetBlock2D, Attention, Upsample2D))]
    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance (hooks)
    for block in blocks:
        block.forward = CheckpointedForward(block.forward)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def latent_reward(vae: torch.nn.Module, reward: Union[str, Callable, Reward], prompts: Sequence[str], *,
                  decode_chunk: int = 1, checkpoint_vae: bool = True,
                  scaling_factor: Optional[float] = None) -> LatentReward:
    """`reward_fn(x0_latents) -> (B,)` for `rlr_fast.estimate`, from an image reward (name, Reward or callable).

    Latents are divided by `scaling_factor` (default `vae.config.scaling_factor`), decoded
    `decode_chunk` samples per VAE call (each call, and each block inside it, checkpointed when
    `checkpoint_vae`), outside autocast in the VAE's dtype, mapped from
    [-1, 1] to [0, 1] with a clamp, and scored against `prompts` (one per sample).
    """
    return LatentReward(vae, reward, prompts, decode_chunk=decode_chunk, checkpoint_vae=checkpoint_vae,
                        scaling_factor=scaling_factor)
