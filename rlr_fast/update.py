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

from .baselines import ValueStatistics
from .config import Config
from .cuda_graph import GraphedRollout
from .estimators import estimate
from .inference import autocast, initial_noise
from .metrics import jsonable
from .models import SDModels, latent_size
from .profiling import nvtx_range
from .prompts import PromptBank
from .rewards import Reward, latent_reward, video_latent_reward
from .rollout import rollout
from .video import is_video_unet


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
        self.store_x0_hat = cfg.needs_x0_hat  # never with method=auto: designs do not use the value baseline
        self.graphed, self.kind, self.reason = None, "eager", None
        if cfg.rollout == "eager":
            self.reason = "rollout='eager' was asked for"
        elif self.store_x0_hat:  # Config refuses rollout='cuda_graph' with it
            self.reason = "baseline='value' needs each step's x0 estimate, which the CUDA-graph rollout does not store"
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
                       backend=self.backend, store_x0_hat=self.store_x0_hat, **kwargs)


# estimate's stats that count work: summed over an update's micro-batches
COUNTS = ("unet_forward", "unet_backward", "unet_steps", "reward_forward", "reward_backward", "value_fallbacks")


@dataclass
class Gradients:
    """What the micro-batches of one update produced: .grad is accumulated on the LoRA parameters."""

    rewards: list[float]
    stats: dict
    skipped: Optional[str]  # "reward" or "gradient" when the update must not be applied
    grad_norm: Optional[float]
    value_state: Optional[ValueStatistics] = None  # the running value fit after these micro-batches


class _WatchedReward:
    """Passes the reward through and remembers whether its values were all finite."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.nonfinite = False

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        values = self.reward_fn(x0)
        self.nonfinite = bool(torch.is_tensor(values) and not torch.isfinite(values.detach()).all())
        return values


def sample_batch(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
                 generator: torch.Generator, device: torch.device, dtype: torch.dtype):
    """One micro-batch as training draws it from `generator`: its prompt ids, its rollout at the run's
    resolution (and frames), and the reward of its x_0 latents (decoded in chunks, frame by frame for video)."""
    ids = draw_prompt_ids(len(bank.prompts), cfg.batch_size, cfg.images_per_prompt, generator)
    x_T = initial_noise(models.unet, cfg.batch_size, generator, device,
                        latent_size(cfg.resolution, models.unet.config, models.vae.config), cfg.num_frames)
    with nvtx_range("rollout"), autocast(device, dtype):
        traj = rollout_fn(x_T, num_steps=cfg.num_steps, eta=cfg.eta, generator=generator,
                          **bank.batch(ids, cfg.guidance_scale))
    to_latent = video_latent_reward if is_video_unet(models.unet) else latent_reward
    return ids, traj, to_latent(models.vae, reward, [bank.prompts[i] for i in ids], decode_chunk=cfg.decode_chunk,
                                checkpoint_vae=cfg.checkpoint_vae)


def gradients(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
               params: list, generators: dict, device: torch.device, dtype: torch.dtype,
               value_state: Optional[ValueStatistics] = None) -> Gradients:
    """The gradient of one optimizer step over `grad_accum` micro-batches, averaged and clipped.

    Changes nothing but .grad and the generators, so a step abandoned here leaves no trace in a
    checkpoint: the running value fit (`value_state`) is updated on a copy, returned for the caller
    to keep when it commits the step. A NaN/Inf reward or gradient marks the update skipped.
    """
    for p in params:
        p.grad = None
    rewards: list[float] = []
    stats: dict = {}
    value_state = None if value_state is None else value_state.copy()
    for _ in range(cfg.grad_accum):
        ids, traj, latent_fn = sample_batch(cfg, models, bank, reward, rollout_fn, generators["sampling"], device,
                                            dtype)
        reward_fn = _WatchedReward(latent_fn)
        try:
            with nvtx_range("estimate"), autocast(device, dtype):
                micro = estimate(models.unet, traj, reward_fn, cfg.estimator_options(),
                                 generator=generators["estimator"], prompt_ids=ids, value_state=value_state)
        except ValueError:
            if not reward_fn.nonfinite:
                raise
            return Gradients(rewards, stats, "reward", None, value_state)
        rewards += micro["rewards"]
        for key in COUNTS:  # counts add up over micro-batches
            if key in micro:
                micro[key] += stats.get(key, 0)
        stats = micro
    for p in params:
        if p.grad is not None:
            p.grad /= cfg.grad_accum
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return Gradients(rewards, stats, None if math.isfinite(grad_norm) else "gradient", grad_norm, value_state)


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


def design_estimator(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
                     generator: torch.Generator, device: torch.device, dtype: torch.dtype):
    """method='auto': the estimator rlr_fast.design chooses from cfg.design_pilots pilot batches, drawn as
    training batches are but from `generator` (the training batches stay those of any fixed method)."""
    from .design import Pilot, design

    def pilot() -> Pilot:
        ids, traj, latent_fn = sample_batch(cfg, models, bank, reward, rollout_fn, generator, device, dtype)
        return Pilot(traj, latent_fn, ids)

    with nvtx_range("design"), autocast(device, dtype):
        return design(models.unet, pilot, pilots=cfg.design_pilots, budget=cfg.design_budget, max_h=cfg.design_max_h,
                      max_memory_gb=cfg.max_memory_gb, config=cfg, differentiable=reward.differentiable, seed=cfg.seed)
