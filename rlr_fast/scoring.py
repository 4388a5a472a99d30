"""Rewards as every estimator takes them: scored once per batch, checked finite, counted.

The chain estimators (rlr_fast.estimators) and SQDF (rlr_fast.sqdf) both score latents with the caller's
`reward_fn`, refuse a batch with a NaN or Inf reward on any rank, and report how many images the reward
scored; that shared part lives here, below both.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .distributed import Ranks
from .profiling import nvtx_range
from .rollout import Trajectory

RewardFn = Callable[[torch.Tensor], torch.Tensor]


class CountedReward:
    """`reward_fn` counting what it did: every image it scored, and those scored with grad enabled on an
    input that requires grad (their dR/dx0 is taken)."""

    def __init__(self, reward_fn: RewardFn):
        self.reward_fn = reward_fn
        self.images = self.backward_images = 0

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        self.images += x0.shape[0]
        if x0.requires_grad and torch.is_grad_enabled():
            self.backward_images += x0.shape[0]
        return self.reward_fn(x0)

    def counts(self) -> dict:
        return {"reward_images": self.images, "reward_backward_images": self.backward_images}


class NonFiniteRewards(ValueError):
    """A reward of the batch is NaN or Inf, so no gradient is estimated from it (on any rank)."""


def chain_rewards(reward_fn: RewardFn, traj: Trajectory, need_grad: bool, group: Ranks = Ranks()):
    """R(x_0) (B,), the whole batch's rewards (all ranks' in rank order: `group.gather`) and, when
    `need_grad`, dR/dx_0; the reward's graph is freed before returning.

    Computing dR/dx_0 first (phase one) and sweeping the model afterwards (phase two) means the
    reward's activations and the model's are never alive together. Finiteness is checked on the
    whole batch, so every rank refuses the same batch.
    """
    return score_latents(reward_fn, traj.x0, need_grad, group)


def score_latents(reward_fn: RewardFn, x0: torch.Tensor, need_grad: bool, group: Ranks = Ranks()):
    """R(x0) (B,) of latents x0, the whole batch's, and when `need_grad` dR/dx0 (see `chain_rewards`)."""
    batch = x0.shape[0]
    x0 = x0.detach().requires_grad_(need_grad)
    with nvtx_range("reward"), torch.set_grad_enabled(need_grad):
        r = reward_fn(x0)
    if not torch.is_tensor(r) or r.shape != (batch,):
        raise ValueError(f"reward_fn must return a tensor of shape ({batch},) (one reward "
                         f"per sample), got {getattr(r, 'shape', type(r).__name__)}")
    everyone = group.gather(r.detach())
    bad = int((~torch.isfinite(everyone)).sum())
    if bad:
        raise NonFiniteRewards(f"{bad} of {everyone.numel()} rewards are not finite (NaN or Inf); "
                               "no gradient was applied")
    if not need_grad:
        return r.detach(), everyone, None
    if r.grad_fn is None:
        raise ValueError("this estimator needs dR/dx0 but the reward is not differentiable "
                         "(its output has no gradient path to x0); use method='zo' or 'ddpo', "
                         "or method='rlr' with first_order_steps=0")
    (dr,) = torch.autograd.grad(r.sum(), x0)  # rewards are per sample: d(sum R)/dx0_b = dR_b/dx0_b
    return r.detach(), everyone, dr


def reward_stats(rewards: Optional[torch.Tensor]) -> dict:
    """The stats keys reward_mean, reward_std and rewards of the batch's rewards (all None without them)."""
    if rewards is None:
        return {"reward_mean": None, "reward_std": None, "rewards": None}
    return {"reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "rewards": rewards.tolist()}
