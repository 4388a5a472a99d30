"""What a likelihood-ratio term multiplies the score by: the reward baseline b, the scale s, DDPO's advantages
(within a batch, or from each prompt's recent rewards as DDPO's training loop keeps them).

A likelihood-ratio term of a sample weighs its score by (R - b) / s. Any b computed without that
sample's own noise keeps the estimate unbiased (the score has mean zero given everything else);
dividing by s estimates grad J / s, which is unbiased only when s is fixed, so a scale taken from
the batch (normalize=True) is offered but slightly biased (docs/estimator.md).

Every baseline is a function (rewards (B,), options, prompt_ids) -> b (B,), one value per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

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


@dataclass(frozen=True)
class PromptRewardHistory:
    """DDPO's per-prompt reward statistics: each prompt's `size` most recent rewards, across epochs.

    Immutable: `advantages` returns the history with the new rewards added, so a training step that
    is abandoned leaves the committed history as it was. `buffers` maps prompt text to its rewards
    (oldest first) and is what a checkpoint stores (JSON: Python floats round-trip exactly).
    """

    size: int
    min_count: int
    buffers: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if self.size < 1 or not 1 <= self.min_count <= self.size:
            raise ValueError(f"ddpo per-prompt statistics need 1 <= min_count <= buffer size, got min_count="
                             f"{self.min_count}, size={self.size} (a larger min_count is never reached)")

    def advantages(self, prompts: Sequence[str], rewards: torch.Tensor) -> tuple[torch.Tensor, "PromptRewardHistory"]:
        """(R - mean) / (std + 1e-6) per sample, float64, and the history with `rewards` added.

        Each prompt's statistics are those of its buffer once it holds `min_count` rewards (this
        epoch's included); until then the whole batch's, as DDPO's stat tracker does. Standard
        deviations are population ones (ddof = 0).
        """
        if len(prompts) != rewards.numel():
            raise ValueError(f"got {len(prompts)} prompts for {rewards.numel()} rewards")
        values = rewards.detach().double().cpu()
        buffers = dict(self.buffers)
        advantages = torch.empty_like(values)
        for prompt in dict.fromkeys(prompts):
            mine = torch.tensor([p == prompt for p in prompts])
            buffers[prompt] = (buffers.get(prompt, ()) + tuple(values[mine].tolist()))[-self.size:]
            reference = torch.tensor(buffers[prompt], dtype=torch.float64) \
                if len(buffers[prompt]) >= self.min_count else values
            advantages[mine] = (values[mine] - reference.mean()) / (reference.std(correction=0) + 1e-6)
        return advantages.to(rewards.device), PromptRewardHistory(self.size, self.min_count, buffers)
