"""One optimizer step of fine-tuning: prompts and noise drawn, a rollout (replayed from a CUDA
graph on a GPU), the reward through the VAE, the gradient estimate accumulated over micro-batches
and clipped, then AdamW with warm-up. `gradients` changes nothing but .grad and the generators, so
a step stopped there leaves no trace; `apply` commits it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .config import Config
from .cuda_graph import GraphedRollout
from .estimators import estimate
from .inference import autocast, initial_noise
from .metrics import jsonable
from .models import SDModels, latent_size
from .profiling import nvtx_range
from .rewards import Reward, latent_reward, video_latent_reward
from .rollout import rollout
from .video import is_video_unet


class PromptBank:
    """Every prompt's text embedding, computed once, and the negative prompt's."""

    def __init__(self, models: SDModels, prompts: list[str], negative_prompt: str, chunk: int = 32):
        self.prompts = prompts
        self.cond = torch.cat([models.encode_prompts(prompts[i:i + chunk]) for i in range(0, len(prompts), chunk)])
        self.negative = models.encode_prompts([negative_prompt])

    def batch(self, ids: torch.Tensor, guidance_scale: float) -> dict:
        """rollout's conditioning keywords for prompts `ids`."""
        cond = self.cond[ids.to(self.cond.device)]
        negative = self.negative.expand(len(ids), -1, -1) if guidance_scale != 1.0 else None
        return dict(encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
                    guidance_scale=guidance_scale)


def draw_prompt_ids(num_prompts: int, batch_size: int, images_per_prompt: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) prompt indices: batch_size / images_per_prompt distinct prompts (when there
    are enough), each repeated images_per_prompt times, for per-prompt baselines."""
    groups = batch_size // images_per_prompt
    if groups <= num_prompts:
        chosen = torch.randperm(num_prompts, generator=generator)[:groups]
    else:
        chosen = torch.randint(num_prompts, (groups,), generator=generator)
    return chosen.repeat_interleave(images_per_prompt)


class TrainingRollout:
    """The loop's rollout: replayed from a CUDA graph on a GPU (rlr_fast.cuda_graph), eager otherwise.

    `kind` ("cuda_graph" or "eager") and `reason` (why eager) are recorded in every metrics record
    and the summary. A graph that fails (capture, memory) falls back to eager for the rest of the
    run with a one-line reason, redrawing the failed rollout's noise from the same generator state.
    """

    def __init__(self, cfg: Config, models: SDModels, device: torch.device):
        self.models, self.split_cfg, self.backend = models, cfg.split_cfg, cfg.backend
        self.graphed, self.kind, self.reason = None, "eager", None
        if cfg.rollout == "eager":
            self.reason = "rollout='eager' was asked for"
        elif cfg.rollout == "auto" and device.type != "cuda":
            self.reason = f"device is {device.type} (CUDA graphs need a GPU)"
        else:
            self.graphed, self.kind = GraphedRollout(models.unet, models.scheduler, split_cfg=cfg.split_cfg,
                                                     backend=cfg.backend), "cuda_graph"

    def __call__(self, x_T: torch.Tensor, *, generator: torch.Generator, **kwargs):
        if self.graphed is not None:
            state = generator.get_state()
            try:
                return self.graphed(x_T, generator=generator, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the graph path falls back to the eager one
                first_line = (str(e).splitlines() or [""])[0]
                self.graphed, self.kind = None, "eager"
                self.reason = f"CUDA graph failed: {type(e).__name__}: {first_line}"
                print(f"rollout: eager from now on ({self.reason})", file=sys.stderr)
                generator.set_state(state)
        return rollout(self.models.unet, self.models.scheduler, x_T, generator=generator, split_cfg=self.split_cfg,
                       backend=self.backend, **kwargs)


@dataclass
class Gradients:
    """What the micro-batches of one update produced: .grad is accumulated on the LoRA parameters."""

    rewards: list[float]
    stats: dict
    skipped: Optional[str]  # "reward" or "gradient" when the update must not be applied
    grad_norm: Optional[float]


class _WatchedReward:
    """Passes the reward through and remembers whether its values were all finite."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.nonfinite = False

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        values = self.reward_fn(x0)
        self.nonfinite = bool(torch.is_tensor(values) and not torch.isfinite(values.detach()).all())
        return values


def gradients(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
               params: list, generators: dict, device: torch.device, dtype: torch.dtype) -> Gradients:
    """The gradient of one optimizer step over `grad_accum` micro-batches, averaged and clipped.

    Changes nothing but .grad and the generators, so a step abandoned here leaves no trace in a
    checkpoint. A NaN/Inf reward or gradient marks the update skipped.
    """
    for p in params:
        p.grad = None
    rewards: list[float] = []
    stats: dict = {}
    for _ in range(cfg.grad_accum):
        ids = draw_prompt_ids(len(bank.prompts), cfg.batch_size, cfg.images_per_prompt, generators["sampling"])
        x_T = initial_noise(models.unet, cfg.batch_size, generators["sampling"], device,
                            latent_size(cfg.resolution, models.unet.config, models.vae.config), cfg.num_frames)
        with nvtx_range("rollout"), autocast(device, dtype):
            traj = rollout_fn(x_T, num_steps=cfg.num_steps, eta=cfg.eta, generator=generators["sampling"],
                              **bank.batch(ids, cfg.guidance_scale))
        to_latent = video_latent_reward if is_video_unet(models.unet) else latent_reward
        reward_fn = _WatchedReward(to_latent(models.vae, reward, [bank.prompts[i] for i in ids],
                                             decode_chunk=cfg.decode_chunk, checkpoint_vae=cfg.checkpoint_vae))
        try:
            with nvtx_range("estimate"), autocast(device, dtype):
                micro = estimate(models.unet, traj, reward_fn, cfg.estimator_options(),
                                 generator=generators["estimator"], prompt_ids=ids)
        except ValueError:
            if not reward_fn.nonfinite:
                raise
            return Gradients(rewards, stats, "reward", None)
        rewards += micro["rewards"]
        for key in ("unet_forward", "unet_backward"):  # counts add up over micro-batches
            micro[key] += stats.get(key, 0)
        stats = micro
    for p in params:
        if p.grad is not None:
            p.grad /= cfg.grad_accum
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return Gradients(rewards, stats, None if math.isfinite(grad_norm) else "gradient", grad_norm)


def apply(cfg: Config, step: int, grads: Gradients, optimizer: torch.optim.Optimizer) -> dict:
    """Apply one update (unless skipped) with the warm-up learning rate; returns its metrics record."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if grads.skipped is None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        with nvtx_range("optimizer step"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = np.array(grads.rewards) if grads.rewards and not grads.skipped else None
    estimator = {k: v for k, v in grads.stats.items() if k not in ("rewards", "reward_mean", "reward_std")}
    return jsonable({
        "step": step + 1,
        "reward_mean": None if values is None else float(values.mean()),
        "reward_std": None if values is None else float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "grad_norm": grads.grad_norm, "lr": lr,
        "skipped": grads.skipped or False, "estimator": estimator,
    })
