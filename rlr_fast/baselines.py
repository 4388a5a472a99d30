"""What a likelihood-ratio term multiplies the score by: the reward baseline b, the scale s, DDPO's advantages
(within a batch, or from each prompt's recent rewards as DDPO's training loop keeps them).

A likelihood-ratio term of a sample weighs its score by (R - b) / s. Any b computed without that
sample's own noise keeps the estimate unbiased (the score has mean zero given everything else);
dividing by s estimates grad J / s, which is unbiased only when s is fixed, so a scale taken from
the batch (normalize=True) is offered but slightly biased (docs/estimator.md).

`reward_baseline` gives one b per sample (none, loo, loo_prompt, a constant). The value baseline
(docs/estimator.md §10) gives one per step and sample, b_t = a_t q_t + c_t with q_t the reward of the
rollout's Tweedie estimate x0_hat(x_t): `proxy_rewards` scores x0_hat, `value_baseline` fits (a_t, c_t)
per step by least squares on pairs (q_t, R) that never include the sample's own, and
`ValueStatistics` carries the pairs of earlier estimates for the running fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

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


# DDPO's standardisation, as ddpo-pytorch's stat tracker and our training loop: population std (ddof 0) + 1e-6
DDPO_STD_EPS = 1e-6


def standardised(values: torch.Tensor, reference: torch.Tensor, eps: float = DDPO_STD_EPS) -> torch.Tensor:
    """(values - mean) / (std + eps) with the mean and population std of `reference`, as DDPO (eps 1e-6) and
    GRPO (1e-4) standardise."""
    return (values - reference.mean()) / (reference.std(correction=0) + eps)


def ddpo_advantages(rewards: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None,
                    eps: float = DDPO_STD_EPS) -> torch.Tensor:
    """Rewards standardised within each prompt's samples (the whole batch without prompt_ids), as DDPO's
    training loop standardises them (`standardised`; one sample of a prompt gets 0)."""
    if prompt_ids is None:
        groups = [torch.arange(rewards.numel(), device=rewards.device)]
    else:
        ids = prompt_ids.to(rewards.device)
        groups = [torch.nonzero(ids == v).flatten() for v in ids.unique()]
    advantages = torch.zeros_like(rewards)
    for g in groups:
        advantages[g] = standardised(rewards[g], rewards[g], eps)
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
            advantages[mine] = standardised(values[mine], reference)
        return advantages.to(rewards.device), PromptRewardHistory(self.size, self.min_count, buffers)


# ----------------------------------------------------------------------------------------------
# The value baseline: b_t = a_t q_t + c_t, (a_t, c_t) fitted without the sample's own pair

# Fewer pairs and the fit falls back to their mean reward. For Gaussian q the expected squared error of
# a least-squares prediction from n pairs grows as 1 + 1/(n - 3): unbounded at n = 3. Measured on the
# linear toy (SD1.4 schedule, T = 20, zo): a loo fit over 3 pairs (B = 4) doubled the trace variance of
# the plain loo mean, over 4 pairs (B = 5) it cut it 2.7x.
MIN_PAIRS = 4


def proxy_rewards(reward_fn: Callable[[torch.Tensor], torch.Tensor], x0_hat: torch.Tensor,
                  ks: Sequence[int]) -> torch.Tensor:
    """q (len(ks), B) float64: the reward of the Tweedie estimate x0_hat of each step k in `ks`.

    One `reward_fn` call per step on the batch, without grad (a latent reward decodes in its own
    `decode_chunk` pieces). Non-finite values (an x0_hat at high noise can overflow a half-precision
    decode) are returned as NaN; `value_baseline` treats them as missing.
    """
    q = torch.empty(len(ks), x0_hat.shape[1], dtype=torch.float64, device=x0_hat.device)
    with torch.no_grad():
        for i, k in enumerate(ks):
            r = reward_fn(x0_hat[k])
            if not torch.is_tensor(r) or r.shape != q.shape[1:]:
                raise ValueError(f"reward_fn must return a tensor of shape ({q.shape[1]},) on x0_hat too, got "
                                 f"{getattr(r, 'shape', type(r).__name__)}")
            q[i] = r.detach()
    return torch.where(torch.isfinite(q), q, torch.full_like(q, float("nan")))


def surrogate_features(x0: torch.Tensor) -> torch.Tensor:
    """(..., F) float64 features of x0 (..., C, H, W) or (..., D): each channel average-pooled to 2x2 (a
    vector as it is), those values and their squares, and a constant: cheap, and a quadratic reward of
    a vector is linear in them."""
    x = x0.detach().double()
    if x.dim() >= 4:  # images (and video frames) pool to 2x2 per channel
        lead = x.shape[:-2]
        x = torch.nn.functional.adaptive_avg_pool2d(x.reshape(-1, *x.shape[-2:]), 2).reshape(*lead[:-1], -1)
    return torch.cat([x, x * x, torch.ones_like(x[..., :1])], dim=-1)


class RewardSurrogate:
    """value_proxy='surrogate': a ridge regression of R on `surrogate_features(x0)`, fitted on the (x0, R) pairs
    of earlier estimates only (never the batch it is evaluated for), so its value at a step's x0_hat is a
    function of the state and earlier data: a baseline, without a reward call. Earlier pairs are decayed
    like the running value fit's. Until it has as many pairs as features it predicts NaN (no proxy)."""

    RIDGE = 1e-6  # relative to the mean diagonal of X^T X: keeps the solve defined with collinear features

    def __init__(self, xtx: Optional[torch.Tensor] = None, xtr: Optional[torch.Tensor] = None,
                 count: Optional[torch.Tensor] = None):
        self.xtx, self.xtr = xtx, xtr
        self.count = torch.zeros((), dtype=torch.float64) if count is None else count

    def predict(self, x0: torch.Tensor) -> torch.Tensor:
        """The surrogate reward (...) of x0 (..., sample shape), float64; NaN before enough pairs."""
        features = surrogate_features(x0)
        if self.xtx is None or float(self.count) < features.shape[-1]:
            return torch.full(features.shape[:-1], float("nan"), dtype=torch.float64, device=x0.device)
        ridge = self.RIDGE * self.xtx.diagonal().mean() * torch.eye(self.xtx.shape[0], dtype=torch.float64)
        weights = torch.linalg.solve(self.xtx + ridge, self.xtr)
        return features @ weights.to(features.device)

    def update(self, x0: torch.Tensor, rewards: torch.Tensor, decay: float) -> None:
        """Decay the earlier pairs by `decay`, then add the pairs (x0 (B, ...), rewards (B,))."""
        features = surrogate_features(x0).cpu()
        r = rewards.detach().double().cpu()
        if self.xtx is None:
            n = features.shape[-1]
            self.xtx, self.xtr = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.xtx = decay * self.xtx + features.T @ features
        self.xtr = decay * self.xtr + features.T @ r
        self.count = decay * self.count + r.numel()


class Moments:
    """Weighted moments of pairs (q, R) per step: count, means, sum of squared q deviations, co-deviation.

    Kept centred (not as raw sums) so that merging and removing pairs stays exact when the rewards
    have a large mean against their spread. The fields share one shape, float64.
    """

    FIELDS = ("count", "mean_q", "mean_r", "ss_q", "ss_qr")

    def __init__(self, count, mean_q, mean_r, ss_q, ss_qr):
        self.count, self.mean_q, self.mean_r, self.ss_q, self.ss_qr = count, mean_q, mean_r, ss_q, ss_qr

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Moments":
        """`fn` applied to every field (select steps, broadcast, move)."""
        return Moments(*(fn(getattr(self, f)) for f in self.FIELDS))

    def merged(self, other: "Moments") -> "Moments":
        """The moments of both sets of pairs (Chan, Golub and LeVeque's pairwise update)."""
        count = self.count + other.count
        share = other.count / count.clamp(min=1e-300)
        dq, dr = other.mean_q - self.mean_q, other.mean_r - self.mean_r
        cross = self.count * share  # n1 n2 / (n1 + n2)
        return Moments(count, self.mean_q + dq * share, self.mean_r + dr * share,
                       self.ss_q + other.ss_q + dq * dq * cross, self.ss_qr + other.ss_qr + dq * dr * cross)


def _batch_moments(q: torch.Tensor, rewards: torch.Tensor):
    """Moments per row of q (S, B) paired with rewards (B,), NaN q missing; and per pair its validity
    and deviations from its row's means (0 where missing)."""
    valid = ~torch.isnan(q)
    w = valid.double()
    q = torch.where(valid, q, torch.zeros_like(q))
    r = rewards.to(q.device, torch.float64).expand_as(q)
    count = w.sum(1)
    mean_q = (w * q).sum(1) / count.clamp(min=1)
    mean_r = (w * r).sum(1) / count.clamp(min=1)
    dq, dr = w * (q - mean_q[:, None]), w * (r - mean_r[:, None])
    return Moments(count, mean_q, mean_r, (dq * dq).sum(1), (dq * dr).sum(1)), valid, dq, dr


def leave_own_out(q: torch.Tensor, rewards: torch.Tensor) -> Moments:
    """Per (step, sample), shape (S, B): the moments of the batch's pairs at that step without the sample's own.

    Removing one pair from n moves the means by its deviation / (n - 1) and the sums of squares by
    deviation^2 * n / (n - 1); a missing pair (NaN q) was never counted.
    """
    batch, valid, dq, dr = _batch_moments(q, rewards)
    n = batch.count[:, None]
    rest = n - valid.double()
    grow = torch.where(valid, n / rest.clamp(min=1), torch.zeros_like(n))
    return Moments(rest, batch.mean_q[:, None] - dq / rest.clamp(min=1), batch.mean_r[:, None] - dr / rest.clamp(min=1),
                   batch.ss_q[:, None] - dq * dq * grow, batch.ss_qr[:, None] - dq * dr * grow)


def value_baseline(q: torch.Tensor, rewards: torch.Tensor, history: Optional[Moments] = None) -> tuple[torch.Tensor, int]:
    """b (S, B) = a q + c per step and sample, (a, c) the least-squares fit of R on q over the sample's pool.

    The pool of sample b at a step is the other samples' pairs at that step (`leave_own_out`), plus
    `history` (moments (S,) of earlier estimates' pairs) for the running fit: never the sample's own
    pair, which would carry its own noise into its baseline. With fewer than MIN_PAIRS pairs, no spread
    of q, or a missing q_b, the baseline is the pool's mean reward (0 for an empty pool). Returns b and
    the number of such fallbacks.
    """
    pooled = leave_own_out(q, rewards)
    if history is not None:
        pooled = pooled.merged(history.map(lambda v: v[:, None].to(q.device)))
    valid = ~torch.isnan(q)
    spread = pooled.ss_q > 1e-12 * (pooled.ss_q + pooled.count * pooled.mean_q ** 2)
    sloped = valid & (pooled.count >= MIN_PAIRS) & spread
    slope = torch.where(sloped, pooled.ss_qr / pooled.ss_q.clamp(min=1e-300), torch.zeros_like(q))
    b = pooled.mean_r + slope * (torch.where(sloped, q, pooled.mean_q) - pooled.mean_q)
    b = torch.where(pooled.count > 0, b, torch.zeros_like(b))
    return b, int((~sloped).sum())


class ValueStatistics:
    """The running value fit's state: per step k, the moments of (q_t, R) pairs of earlier estimates.

    `estimate(..., value_state=stats)` fits each step's baseline on these (and the batch's other
    samples), then folds the batch in: every earlier pair's weight is multiplied by `value_decay`
    per estimate. Keep one per training run; `state_dict` / `load_state_dict` checkpoint it
    (float64 tensors, exact).
    """

    def __init__(self):
        self.moments: Optional[Moments] = None  # fields (T,)
        self.surrogate = RewardSurrogate()  # value_proxy='surrogate': R regressed on x0 of earlier estimates

    @property
    def num_steps(self) -> Optional[int]:
        return None if self.moments is None else self.moments.count.numel()

    def _check_steps(self, num_steps: int) -> None:
        if self.moments is not None and self.num_steps != num_steps:
            raise ValueError(f"this value_state holds statistics of a {self.num_steps}-step chain, the trajectory "
                             f"has {num_steps} steps; use a new ValueStatistics for another num_steps")

    def history(self, num_steps: int, ks: Sequence[int]) -> Optional[Moments]:
        """The moments (len(ks),) of steps `ks`; None before the first update."""
        self._check_steps(num_steps)
        if self.moments is None:
            return None
        return self.moments.map(lambda v: v[list(ks)])

    def update(self, num_steps: int, ks: Sequence[int], q: torch.Tensor, rewards: torch.Tensor, decay: float) -> None:
        """Decay every step's pairs by `decay`, then add the batch's pairs (q (len(ks), B)) at steps `ks`."""
        self._check_steps(num_steps)
        if self.moments is None:
            self.moments = Moments(*(torch.zeros(num_steps, dtype=torch.float64) for _ in Moments.FIELDS))
        m = self.moments
        m.count, m.ss_q, m.ss_qr = m.count * decay, m.ss_q * decay, m.ss_qr * decay
        ks = list(ks)
        new = m.map(lambda v: v[ks]).merged(_batch_moments(q, rewards)[0].map(lambda v: v.cpu()))
        for f in Moments.FIELDS:
            getattr(m, f)[ks] = getattr(new, f)

    def copy(self) -> "ValueStatistics":
        out = ValueStatistics()
        out.load_state_dict(self.state_dict())
        return out

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """As rlr_fast.update.MethodState: on-policy training keeps the running fit as its state."""
        return self.state_dict(), {}

    SURROGATE_KEYS = ("surrogate_xtx", "surrogate_xtr", "surrogate_count")

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {} if self.moments is None else {f: getattr(self.moments, f).clone() for f in Moments.FIELDS}
        if self.surrogate.xtx is not None:
            state.update(zip(self.SURROGATE_KEYS, (self.surrogate.xtx.clone(), self.surrogate.xtr.clone(),
                                                   self.surrogate.count.clone())))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        held = [state.pop(k, None) for k in self.SURROGATE_KEYS]
        self.surrogate = RewardSurrogate(*(None if v is None else v.detach().to("cpu", torch.float64).clone()
                                           for v in held))
        if not state:
            self.moments = None
            return
        missing = [f for f in Moments.FIELDS if f not in state]
        if missing:
            raise ValueError(f"value_state is missing {missing}; expected the keys {list(Moments.FIELDS)}")
        sizes = {tuple(state[f].shape) for f in Moments.FIELDS}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"value_state tensors must all be (num_steps,), got shapes "
                             f"{ {f: tuple(state[f].shape) for f in Moments.FIELDS} }")
        self.moments = Moments(*(state[f].detach().to("cpu", torch.float64).clone() for f in Moments.FIELDS))
