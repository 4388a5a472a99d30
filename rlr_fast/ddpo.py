"""DDPO as it is run: sample an epoch, then take several optimizer steps on it (docs/estimator.md §8.4).

The public DDPO training loop (github.com/kvablack/ddpo-pytorch) does this, and so does
`DDPOSteps`, the StepMethod of method="ddpo" (rlr_fast.update explains the mechanism):

1. Epoch: `ddpo_rollout_batches` rollout batches of `batch_size`, each sample scored once by the
   reward. Advantages are the rewards standardised per prompt from each prompt's recent rewards
   (`PromptRewardHistory`: a FIFO of `ddpo_buffer_size`, the epoch's statistics until a prompt has
   `ddpo_min_count`), clipped to +-ddpo_adv_clip.
2. `ddpo_inner_epochs` passes over the epoch: each shuffles the samples (the "estimator"
   generator) and splits them into `ddpo_minibatches` minibatches; every `grad_accum` minibatches
   make one optimizer step of the clipped surrogate.

The importance ratio's denominator is the policy that sampled the epoch (its draws are stored in
the trajectory), so the first step of an epoch is on-policy: its ratio is 1 exactly (the denominator
is the recomputed mean, so recomputation rounding cannot clip it; `estimate(on_policy=True)`), and
every later one is off-policy: the ratio moves away from 1 and the clip range acts. Log-densities are
per-element means as in ddpo-pytorch, so `clip_range` means what theirs does.
ddpo-pytorch also shuffles each sample's timesteps; with its default of training on every timestep
that only reorders a sum inside one optimizer step, so it is not reproduced (training on a random
subset of timesteps is not offered).

The state between steps (`DDPOState`: the epoch, its advantages, the minibatches left, the reward
history) goes into checkpoints, so a run stopped mid-epoch resumes bit-exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .baselines import PromptRewardHistory
from .grpo import group_advantages
from .rollout import Trajectory, concat_samples, select_samples, trajectory_from, trajectory_tensors
from .update import COST_KEYS, Gradients, StepMethod


@dataclass(frozen=True)
class DDPOState:
    """DDPO between optimizer steps. Never changed in place: every step returns a new one."""

    history: PromptRewardHistory
    epoch: Optional[Trajectory] = None  # the current epoch's samples, side by side
    advantages: Optional[torch.Tensor] = None  # (N,) clipped, float64
    passes_left: int = 0  # passes over the epoch not yet started
    queue: tuple[tuple[int, ...], ...] = ()  # minibatches (sample indices) of this pass still to visit

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        meta = {"history": {"size": self.history.size, "min_count": self.history.min_count,
                            "buffers": {p: list(v) for p, v in self.history.buffers.items()}},
                "passes_left": self.passes_left, "queue": [list(q) for q in self.queue], "epoch": None}
        tensors = {}
        if self.epoch is not None:
            epoch, meta["epoch"] = trajectory_tensors(self.epoch)
            tensors = {f"epoch/{k}": v for k, v in epoch.items()}
            tensors["advantages"] = self.advantages.detach().cpu()
        return tensors, meta


class DDPOSteps(StepMethod):
    """method="ddpo": several optimizer steps per sampled epoch."""

    def initial_state(self) -> DDPOState:
        return DDPOState(PromptRewardHistory(self.ctx.cfg.ddpo_buffer_size, self.ctx.cfg.ddpo_min_count))

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> DDPOState:
        h = meta["history"]
        history = PromptRewardHistory(h["size"], h["min_count"], {p: tuple(v) for p, v in h["buffers"].items()})
        epoch = advantages = None
        if meta["epoch"] is not None:
            device = self.ctx.device
            epoch = trajectory_from({k[len("epoch/"):]: v for k, v in tensors.items() if k.startswith("epoch/")},
                                    meta["epoch"], device)
            advantages = tensors["advantages"].to(device)
        return DDPOState(history, epoch, advantages, meta["passes_left"], tuple(tuple(q) for q in meta["queue"]))

    def gradients(self, state: DDPOState) -> Gradients:
        """The next optimizer step: `grad_accum` minibatches of the epoch, sampling a new epoch first
        when the last one's passes are done. A NaN/Inf reward in a new epoch skips the step and drops
        the epoch (the next step samples another)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        ctx.zero_grad()
        cost = dict.fromkeys(COST_KEYS, 0)
        rewards: list[float] = []
        if not state.queue:
            if state.passes_left == 0:
                sampled = self._sample_epoch(state, cost)
                if sampled is None:
                    return Gradients([], {}, "reward", None, state=state, cost=cost)
                state, rewards = sampled
            state = self._shuffle(state)
        stats: dict = {}
        on_policy = bool(rewards)  # the epoch was sampled by the parameters of this, its first step
        for _ in range(cfg.grad_accum):
            index = torch.tensor(state.queue[0], device=state.advantages.device)
            state = dataclasses.replace(state, queue=state.queue[1:])
            stats = ctx.estimate(select_samples(state.epoch, index), None, cost, stats,
                                 advantages=state.advantages[index], on_policy=on_policy)
        stats.update(epoch_samples=state.epoch.batch_size, minibatches_left=len(state.queue),
                     passes_left=state.passes_left)
        grad_norm = ctx.average_and_clip(cfg.grad_accum)
        return Gradients(rewards, stats, None if math.isfinite(grad_norm) else "gradient", grad_norm,
                         state=state, cost=cost)

    def _sample_epoch(self, state: DDPOState, cost: dict) -> Optional[tuple[DDPOState, list[float]]]:
        """A new epoch: its rollouts, their rewards (once each) and advantages; None for a NaN/Inf reward."""
        ctx, cfg = self.ctx, self.ctx.cfg
        trajs, batches = [], []
        for _ in range(cfg.ddpo_rollout_batches):
            scored = ctx.sample_scored(cost)
            if scored is None:
                return None
            ids, traj, r = scored
            trajs.append(traj)
            batches.append((ids, r))
        rewards = torch.cat([r for _, r in batches])
        advantages, history = self.epoch_advantages(state.history, batches)
        epoch = concat_samples(trajs)
        advantages = advantages.clamp(-cfg.ddpo_adv_clip, cfg.ddpo_adv_clip).to(epoch.latents.device)
        return DDPOState(history, epoch, advantages, passes_left=cfg.ddpo_inner_epochs), rewards.tolist()

    def epoch_advantages(self, history: PromptRewardHistory, batches: list[tuple[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, PromptRewardHistory]:
        """The epoch's advantages (N,), before clipping, and the reward history after it, from each rollout
        batch's (prompt ids, rewards): standardised by each prompt's recent rewards."""
        prompts = [self.ctx.bank.prompts[i] for ids, _ in batches for i in ids]
        return history.advantages(prompts, torch.cat([r for _, r in batches]))

    def _shuffle(self, state: DDPOState) -> DDPOState:
        """The next pass: the epoch's samples shuffled and split into ddpo_minibatches minibatches."""
        n = state.epoch.batch_size
        order = torch.randperm(n, generator=self.ctx.generators["estimator"])
        queue = tuple(tuple(chunk.tolist()) for chunk in order.split(n // self.ctx.cfg.ddpo_minibatches))
        return dataclasses.replace(state, queue=queue, passes_left=state.passes_left - 1)


class GRPOSteps(DDPOSteps):
    """method="grpo": DDPO's epochs, passes, minibatches and checkpointed state, with Flow-GRPO's
    advantages: each reward standardised within its group, the samples of its prompt in the same
    rollout batch (images_per_prompt of them; rlr_fast.grpo.group_advantages), no history across
    epochs. Each minibatch's estimate is rlr_fast.grpo's objective."""

    def epoch_advantages(self, history: PromptRewardHistory, batches: list[tuple[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, PromptRewardHistory]:
        return torch.cat([group_advantages(r, ids) for ids, r in batches]), history
