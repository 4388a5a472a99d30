"""One optimizer step of fine-tuning: prompts and noise drawn, a rollout (replayed from a CUDA
graph on a GPU), the reward through the VAE, the gradient estimate accumulated over micro-batches,
averaged over the ranks of a data-parallel run (rlr_fast.distributed) and clipped, then AdamW with
warm-up. `gradients` changes nothing but .grad and the generators, so a step stopped there leaves
no trace; `apply` commits it.

A micro-batch is drawn so that it is the same at any number of ranks: the "sampling" generator
draws the global micro-batch's prompt ids and one seed, and each sample's x_T and step noises come
from its own generator seeded from that seed and the sample's global index (`draw_micro_batch`).
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
from .distributed import Ranks, sample_seeds
from .estimators import NonFiniteRewards, estimate
from .inference import autocast, latent_shape
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


def sample_noise(shape: tuple[int, ...], num_steps: int, seeds: list[int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T (B, *shape) and every step's noise (T, B, *shape) in float32, sample b drawn on the CPU
    from a generator of its own seeded `seeds[b]`: a sample's noise does not depend on the others'."""
    x_T, noises = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        x_T.append(torch.randn(shape, generator=generator))
        noises.append(torch.randn((num_steps, *shape), generator=generator))
    return torch.stack(x_T).to(device), torch.stack(noises, dim=1).to(device)


def draw_micro_batch(cfg: Config, num_prompts: int, models: SDModels, generator: torch.Generator, ranks: Ranks,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of a global micro-batch of `cfg.batch_size`: its prompt ids (b,), x_T and
    step noises (`sample_noise`) at cfg.resolution (and cfg.num_frames for a video UNet).
    `generator` advances the same on every rank and at any world size."""
    ids = draw_prompt_ids(num_prompts, cfg.batch_size, cfg.images_per_prompt, generator)
    seed = int(torch.randint(2**63 - 1, (), generator=generator))
    mine = ranks.share(cfg.batch_size)
    shape = latent_shape(models.unet, latent_size(cfg.resolution, models.unet.config, models.vae.config), cfg.num_frames)
    x_T, noises = sample_noise(shape, cfg.num_steps, sample_seeds(seed, range(cfg.batch_size)[mine]), device)
    return ids[mine], x_T, noises


class TrainingRollout:
    """The loop's rollout: replayed from a CUDA graph on a GPU (rlr_fast.cuda_graph), eager otherwise.

    `kind` ("cuda_graph" or "eager") and `reason` (why eager) are recorded in every metrics record
    and the summary. A graph that fails (capture, memory) falls back to eager for the rest of the
    run with a one-line reason, rolling out the failed rollout's noise again.
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

    def __call__(self, x_T: torch.Tensor, noises: torch.Tensor, **kwargs):
        """The chain from x_T with the given step `noises` (T, B, ...); kwargs as `rollout`'s."""
        if self.graphed is not None:
            try:
                return self.graphed(x_T, noises=noises, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the graph path falls back to the eager one
                first_line = (str(e).splitlines() or [""])[0]
                self.graphed, self.kind = None, "eager"
                self.reason = f"CUDA graph failed: {type(e).__name__}: {first_line}"
                print(f"rollout: eager from now on ({self.reason})", file=sys.stderr)
        return rollout(self.models.unet, self.models.scheduler, x_T, noises=noises, split_cfg=self.split_cfg,
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


def sample_batch(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
                 generator: torch.Generator, device: torch.device, dtype: torch.dtype, ranks: Ranks = Ranks()):
    """This rank's share of one micro-batch as training draws it from `generator` (`draw_micro_batch`): its
    prompt ids, its rollout at the run's resolution (and frames), and the reward of its x_0 latents (decoded
    in chunks, frame by frame for video)."""
    ids, x_T, noises = draw_micro_batch(cfg, len(bank.prompts), models, generator, ranks, device)
    with nvtx_range("rollout"), autocast(device, dtype):
        traj = rollout_fn(x_T, noises, num_steps=cfg.num_steps, eta=cfg.eta, **bank.batch(ids, cfg.guidance_scale))
    to_latent = video_latent_reward if is_video_unet(models.unet) else latent_reward
    return ids, traj, to_latent(models.vae, reward, [bank.prompts[i] for i in ids], decode_chunk=cfg.decode_chunk,
                                checkpoint_vae=cfg.checkpoint_vae)


def gradients(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
              params: list, generators: dict, device: torch.device, dtype: torch.dtype,
              value_state: Optional[ValueStatistics] = None, ranks: Ranks = Ranks()) -> Gradients:
    """The gradient of one optimizer step over `grad_accum` global micro-batches, averaged (over
    micro-batches and ranks) and clipped; this rank rolls out its share of each micro-batch.

    Changes nothing but .grad and the generators, so a step abandoned here leaves no trace in a
    checkpoint: the running value fit (`value_state`, fitted on the whole batch so the same on every
    rank) is updated on a copy, returned for the caller to keep when it commits the step. A NaN/Inf
    reward (on any rank) or gradient marks the update skipped on every rank.
    """
    for p in params:
        p.grad = None
    rewards: list[float] = []
    stats: dict = {}
    value_state = None if value_state is None else value_state.copy()
    for _ in range(cfg.grad_accum):
        ids, traj, reward_fn = sample_batch(cfg, models, bank, reward, rollout_fn, generators["sampling"], device,
                                            dtype, ranks)
        try:
            with nvtx_range("estimate"), autocast(device, dtype):
                micro = estimate(models.unet, traj, reward_fn, cfg.estimator_options(),
                                 generator=generators["estimator"], prompt_ids=ids, group=ranks,
                                 value_state=value_state)
        except NonFiniteRewards:
            return Gradients(rewards, stats, "reward", None, value_state)
        rewards += micro["rewards"]
        for key in COUNTS:  # counts add up over micro-batches
            if key in micro:
                micro[key] += stats.get(key, 0)
        stats = micro
    ranks.average_gradients(params)
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
