"""Video rewards: `reward(video, prompts) -> (B,)` with `video` float in [0, 1], shape (B, F, 3, H, W).

    reward = get_video_reward("aesthetic", clip_path=..., head_path=...)  # any image reward, frame-averaged
    reward = get_video_reward("temporal_consistency")                     # smooth change between frames
    reward = get_video_reward(lambda video, prompts: ...)                 # a callable on whole videos
    reward_fn = video_latent_reward(vae, reward, prompts)                 # what `estimate` takes

Frames come first and channels second (each frame is an image), so `video.flatten(0, 1)` is the
batch of B * F images an image reward scores. diffusers' video pipelines return (B, 3, F, H, W);
`video.transpose(1, 2)` converts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from .base import FunctionReward, Reward, check_values, check_images, check_prompts, get_reward, register_reward
from .latent import LatentReward, autocast_off


def check_video(video: torch.Tensor) -> None:
    """Raise a TypeError/ValueError unless `video` is a float (B, F, 3, H, W) tensor in [0, 1]."""
    if not torch.is_tensor(video):
        raise TypeError(f"a video must be a torch.Tensor (B, F, 3, H, W), got {type(video).__name__}")
    if video.dim() != 5 or video.shape[2] != 3:
        hint = "; diffusers' (B, 3, F, H, W) converts with video.transpose(1, 2)" if video.dim() == 5 else ""
        raise ValueError(f"a video must have shape (B, F, 3, H, W), got {tuple(video.shape)}{hint}")
    check_images(video.flatten(0, 1))


class VideoReward(Reward):
    """Base class of video rewards: subclasses implement `score(video, prompts) -> (B,)`."""

    def forward(self, video: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_video(video)
        prompts = check_prompts(prompts, video.shape[0])
        return check_values(self.score(video, prompts), video, self)


class FunctionVideoReward(VideoReward, FunctionReward):
    """A plain callable `fn(video, prompts) -> (B,)` as a VideoReward (`FunctionReward`'s rules for
    `differentiable`)."""


class FrameAverage(VideoReward):
    """An image reward scored on every frame (against the video's prompt) and averaged over frames.

    `frame_chunk` frames are scored per call of the image reward (all at once when None); with a
    gradient to compute, each call is checkpointed, so only one chunk's reward activations are
    alive in the backward.
    """

    def __init__(self, image_reward: Union[str, Callable, Reward], frame_chunk: Optional[int] = None, **options):
        super().__init__()
        if frame_chunk is not None and (isinstance(frame_chunk, bool) or not isinstance(frame_chunk, int)
                                        or frame_chunk < 1):
            raise ValueError(f"frame_chunk must be a positive int or None, got {frame_chunk!r}")
        self.image_reward = get_reward(image_reward, **options)
        if isinstance(self.image_reward, VideoReward):
            raise TypeError(f"{self.image_reward!r} already scores videos; FrameAverage takes an image reward")
        self.frame_chunk = frame_chunk

    @property
    def differentiable(self) -> bool:
        return self.image_reward.differentiable

    def score(self, video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        b, f = video.shape[:2]
        frames = video.flatten(0, 1)
        frame_prompts = [p for p in prompts for _ in range(f)]
        step = self.frame_chunk or b * f
        grad = torch.is_grad_enabled() and frames.requires_grad and self.frame_chunk is not None
        values = []
        for start in range(0, b * f, step):
            chunk, chunk_prompts = frames[start:start + step], frame_prompts[start:start + step]
            if grad:
                values.append(checkpoint(self.image_reward, chunk, chunk_prompts, use_reentrant=False))
            else:
                values.append(self.image_reward(chunk, chunk_prompts))
        return torch.cat(values).reshape(b, f).mean(1)

    def extra_repr(self) -> str:
        return f"frame_chunk={self.frame_chunk}"


@register_reward("temporal_consistency")
class TemporalConsistency(VideoReward):
    """Minus the mean squared temporal difference of the frames, in [-1, 0] (0 = perfectly consistent).

    order=1 measures how much consecutive frames differ, x_{f+1} - x_f: 0 only for a still video, so
    on its own it rewards stillness; combine it with a content reward. order=2 measures how unevenly
    the video changes, x_{f+1} - 2 x_f + x_{f-1} (divided by 2, to stay in [-1, 1]): 0 for a still
    video and for any pixel changing at a constant rate (a linear fade), large for flicker and jitter.
    The mean runs over frame pairs (or triples), channels and pixels, RGB in [0, 1]. Quadratic in the
    pixels, so differentiable everywhere.
    """

    differentiable = True

    def __init__(self, order: int = 1):
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (frame differences) or 2 (differences of differences), got {order!r}")
        self.order = order

    def score(self, video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if video.shape[1] <= self.order:
            raise ValueError(f"temporal_consistency with order={self.order} needs at least {self.order + 1} frames, "
                             f"got {video.shape[1]}")
        video = video.to(torch.promote_types(video.dtype, torch.float32))
        change = torch.diff(video, n=self.order, dim=1) / self.order
        return -change.square().flatten(1).mean(1)

    def extra_repr(self) -> str:
        return f"order={self.order}"


def get_video_reward(name_or_callable: Union[str, Callable, Reward], **kwargs) -> VideoReward:
    """A VideoReward from a registered name or a Reward: a video reward as it is, an image reward scored
    per frame and averaged (`FrameAverage`; `frame_chunk` is its option, other kwargs go to the image
    reward), or from a callable `fn(video, prompts) -> (B,)` (kwargs: `differentiable`)."""
    if callable(name_or_callable) and not isinstance(name_or_callable, Reward):
        unknown = set(kwargs) - {"differentiable"}
        if unknown:
            raise TypeError(f"a callable video reward takes only the option 'differentiable', got {sorted(unknown)}")
        return FunctionVideoReward(name_or_callable, **kwargs)
    frame_chunk = kwargs.pop("frame_chunk", None)
    reward = get_reward(name_or_callable, **kwargs)
    if not isinstance(reward, VideoReward):
        return FrameAverage(reward, frame_chunk)
    if frame_chunk is not None:
        raise TypeError(f"frame_chunk is an option of frame-averaged image rewards, not of {reward!r}")
    return reward


class VideoLatentReward(LatentReward):
    """`reward_fn(x0_latents (B, C, F, h, w)) -> (B,)`: decode every frame with the image VAE,
    `decode_chunk` frames per VAE call (each call checkpointed when `checkpoint_vae`), and score
    the videos (B, F, 3, H, W) with a video reward against `prompts`."""

    def __init__(self, vae: torch.nn.Module, reward: Union[str, Callable, Reward], prompts: Sequence[str], *,
                 decode_chunk: int = 1, checkpoint_vae: bool = True, scaling_factor: Optional[float] = None):
        super().__init__(vae, get_video_reward(reward), prompts, decode_chunk=decode_chunk,
                         checkpoint_vae=checkpoint_vae, scaling_factor=scaling_factor)

    def __call__(self, x0_latents: torch.Tensor) -> torch.Tensor:
        self._check(x0_latents, "(B, C, F, h, w)")
        b, c, f, h, w = x0_latents.shape
        frames = x0_latents.transpose(1, 2).reshape(b * f, c, h, w)
        with autocast_off():
            images = self.images(frames)
            return self.reward(images.reshape((b, f) + tuple(images.shape[1:])), self.prompts)

    def __repr__(self) -> str:
        return (f"VideoLatentReward({self.reward!r}, batch={len(self.prompts)}, decode_chunk={self.decode_chunk} "
                f"frames, checkpoint_vae={self.checkpoint_vae})")


def video_latent_reward(vae: torch.nn.Module, reward: Union[str, Callable, Reward], prompts: Sequence[str], *,
                        decode_chunk: int = 1, checkpoint_vae: bool = True,
                        scaling_factor: Optional[float] = None) -> VideoLatentReward:
    """`reward_fn(x0_latents) -> (B,)` for `rlr_fast.estimate` on video latents (B, C, F, h, w), from a
    video reward (anything `get_video_reward` takes). Frames decode as `latent_reward` decodes images."""
    return VideoLatentReward(vae, reward, prompts, decode_chunk=decode_chunk, checkpoint_vae=checkpoint_vae,
                             scaling_factor=scaling_factor)
