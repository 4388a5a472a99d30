"""What a likelihood-ratio term multiplies the score by: the reward baseline b, the scale s, DDPO's advantages.

A likelihood-ratio term of a sample weighs its score by (R - b) / s. Any b computed without that
sample's own noise keeps the estimate unbiased (the score has mean zero given everything else);
dividing by s estimates grad J / s, which is unbiased only when s is fixed, so a scale taken from
the batch (normalize=True) is offered but slightly biased (docs/estimator.md).

Every baseline is a function (rewards (B,), options, prompt_ids) -> b (B,), one value per sample.
"""

from __future__ import annotations

from typing import Optional

import torch

from .options import EstimatorOptions


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """The mean reward of the other samples of the batch."""
    n = rewards.numel()
    if n < 2:
        raise ValueError("baseline='loo' (leave-one-out) needs a batch of at least 2 samples")
    return (rewards.sum() - rewards) / (n - 1)


def leave_one_out_per_prompt(rewards: torch.Tensor, prompt_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean reward of the other samples of the same prompt."""
    if prompt_ids is None or prompt_ids.shape != rewards.shape:
        raise ValueError(f"baseline='loo_prompt' needs prompt_ids, one id per sample (shape ({rewards.numel()},)), "
                         f"got {None if prompt_ids is None else tuple(prompt_ids.shape)}")
    ids = prompt_ids.to(rewards.device)
    same = ids[:, None] == ids[None, :]
    others = same.sum(1) - 1
    if (others == 0).any():
        lonely = ids[others == 0].unique().tolist()
        raise ValueError(f"baseline='loo_prompt' needs at least 2 samples of every prompt in the batch; "
                         f"prompt ids {lonely} have one")
    return ((same * rewards[None, :]).sum(1) - rewards) / others


def reward_baseline(rewards: torch.Tensor, options: EstimatorOptions,
                    prompt_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """b (B,) of `options.baseline`: none (0), loo, loo_prompt, or a constant."""
    if options.baseline == "none":
        return torch.zeros_like(rewards)
    if options.baseline == "loo":
        return leave_one_out(rewards)
    if options.baseline == "loo_prompt":
        return leave_one_out_per_prompt(rewards, prompt_ids)
    return torch.full_like(rewards, float(options.baseline))


def reward_scale(rewards: torch.Tensor, options: EstimatorOptions) -> float:
    """s of `options.normalize`: 1 (off), the batch reward std (true; 1 when it is ~0), or the given scale."""
    if options.normalize is False:
        return 1.0
    if options.normalize is True:
        s = float(rewards.std()) if rewards.numel() > 1 else 1.0
        return s if s > 1e-8 else 1.0
    return float(options.normalize)


def ddpo_advantages(rewards: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rewards standardised within each prompt's samples (the whole batch without prompt_ids), as DDPO uses."""
    if prompt_ids is None:
        groups = [torch.arange(rewards.numel(), device=rewards.device)]
    else:
        ids = prompt_ids.to(rewards.device)
        groups = [torch.nonzero(ids == v).flatten() for v in ids.unique()]
    advantages = torch.zeros_like(rewards)
    for g in groups:
        r = rewards[g]
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        advantages[g] = (r - r.mean()) / (std + 1e-8)
    return advantages
