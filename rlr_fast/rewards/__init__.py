"""Rewards: a name (or any callable) -> an object scoring images against their prompts.

A reward is called as `reward(images, prompts) -> (B,)` with `images` float in [0, 1], shape
(B, 3, H, W), and one prompt string per image (the interface and registry: `base.py`).

    reward = get_reward("color_match")
    reward = get_reward("aesthetic", clip_path=..., head_path=...)    # local weights only
    reward = get_reward(lambda images, prompts: images.mean((1, 2, 3)))
    reward_fn = latent_reward(vae, reward, prompts)                   # what `estimate` takes

Built-in names: `available_rewards()`. New ones: decorate a `Reward` subclass (or a factory
returning one) with `@register_reward("name")`. HPSv2 and ImageReward load folders converted from
their released checkpoints by `rlr-fast convert` (`convert.py`).

Videos (B, F, 3, H, W) are scored by video rewards (`video.py`, `get_video_reward`): any image
reward averaged over frames, `temporal_consistency`, or a callable; `video_latent_reward` is the
video `latent_reward`.
"""

from .base import (FunctionReward, Reward, available_rewards, check_images, check_prompts, get_reward,
                   register_reward)
from .latent import LatentReward, latent_reward
from . import clip_models, compression, demo, imagereward  # noqa: E402,F401  (the built-ins register on import)
from .video import (FrameAverage, TemporalConsistency, VideoLatentReward, VideoReward, get_video_reward,
                    video_latent_reward)

__all__ = [
    "Reward", "FunctionReward", "LatentReward", "available_rewards", "check_images", "check_prompts",
    "get_reward", "latent_reward", "register_reward", "VideoReward", "FrameAverage", "TemporalConsistency",
    "VideoLatentReward", "get_video_reward", "video_latent_reward",
]
