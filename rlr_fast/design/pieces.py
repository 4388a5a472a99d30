"""Every step's share of the sweeps on pilot batches, and the trace variances that follow from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..baselines import reward_baseline
from ..options import EstimatorOptions
from ..rollout import Trajectory
from ..scoring import RewardFn, chain_rewards
from ..sweep import CallCounter, pathwise_sweep
from .space import Family


@dataclass
class Pilot:
    """One pilot batch: its trajectory, and (when they differ from design's) its reward and prompt ids."""

    traj: Trajectory
    reward_fn: Optional[RewardFn] = None
    prompt_ids: Optional[torch.Tensor] = None


class GradSketch:
    """The trainable parameters' .grad as `dim` numbers whose inner products equal the full vectors'
    in expectation (a count sketch: each coordinate added with a random sign to a random bucket), or
    the vector itself when it has at most `dim` values. `take()` reads and clears .grad."""

    def __init__(self, params: list, dim: int, seed: int = 0):
        self.params = params
        total = sum(p.numel() for p in params)
        self.exact = total <= dim
        self.dim = total if self.exact else dim
        self.total = total
        self.taken = 0  # steps read: each recomputed step's share is taken once
        g = torch.Generator().manual_seed(seed)
        self.hashes = [] if self.exact else [
            (torch.randint(dim, (p.numel(),), generator=g).to(p.device),
             (2 * torch.randint(2, (p.numel(),), generator=g) - 1).to(p.device, torch.float64)) for p in params]

    def take(self) -> torch.Tensor:
        """(dim,) float64 on the CPU; .grad is None afterwards."""
        if self.exact:
            out = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None else
                             p.grad.detach().flatten().double().cpu() for p in self.params])
        else:
            out = torch.zeros(self.dim, dtype=torch.float64, device=self.params[0].device)
            for p, (bucket, sign) in zip(self.params, self.hashes):
                if p.grad is not None:
                    out.index_add_(0, bucket, p.grad.detach().flatten().double() * sign)
            out = out.cpu()
        for p in self.params:
            p.grad = None
        self.taken += 1
        return out

    def describe(self) -> str:
        return (f"exact ({self.total} values)" if self.exact else
                f"count sketch of {self.total} values into {self.dim}")


@dataclass
class Pieces:
    """Every step's sketched share of one pilot batch's sweeps, with -(R - b) / B and -dR/dx_0 / B
    as `estimate` scales them, so that a design's estimate is a sum of rows.

    pathwise[t - 1]           P_t, step t's share of the pathwise sweep from dR/dx_0 (None: no dR/dx_0)
    half[b][j, i]             step j+1+i's share of the half-order sweep closed at step j+1, baseline b;
                              half[b][t - 1, 0] is step t's likelihood ratio L_t (zero where sigma_t = 0)
    """

    pathwise: Optional[torch.Tensor]  # (T, d)
    half: dict  # baseline -> (T, max_h, d)


def _advantages(baseline, rewards: torch.Tensor, prompt_ids, num_steps: int) -> torch.Tensor:
    """-(R - b_t) / B per step and sample, (T, B): what a likelihood-ratio term of step t weighs its score by."""
    b = reward_baseline(rewards, EstimatorOptions(baseline=baseline), prompt_ids)
    return (-(rewards - b) / rewards.numel()).expand(num_steps, -1)


def record_pieces(model, pilot: Pilot, reward_fn: RewardFn, baselines: Sequence, max_h: int, sketch: GradSketch,
                  options: EstimatorOptions, counter: CallCounter, differentiable: bool) -> Pieces:
    """One pilot batch's pieces: one pathwise sweep over all T steps, and per baseline one half-order
    sweep of up to max_h steps closed at every stochastic step (sweep.pathwise_sweep runs them all)."""
    traj = pilot.traj
    T, d = traj.num_steps, sketch.dim
    try:
        rewards, _, dr = chain_rewards(pilot.reward_fn or reward_fn, traj, differentiable)
    except ValueError as e:
        if differentiable and "not differentiable" in str(e):
            raise ValueError("the reward is not differentiable (its output has no gradient path to x0); pass "
                             "design(..., differentiable=False): only f = 0 designs are then candidates") from None
        raise
    pathwise = None
    if dr is not None:
        pathwise = torch.zeros(T, d, dtype=torch.float64)

        def keep_pathwise(k: int) -> None:
            pathwise[traj.math_step(k) - 1] = sketch.take()

        pathwise_sweep(model, traj, traj.step_index(1), traj.step_index(T), -dr / traj.batch_size, options, counter,
                       after_step=keep_pathwise)
    half = {}
    per_sample = (-1,) + (1,) * (traj.noises.dim() - 2)
    for b in baselines:
        adv = _advantages(b, rewards, pilot.prompt_ids, T)
        shares = half[b] = torch.zeros(T, max_h, d, dtype=torch.float64)
        for j in range(T):
            k_close = traj.step_index(j + 1)
            sigma = traj.sigmas[k_close].to(traj.noises.dtype)
            if float(sigma) == 0.0:
                continue
            cot = traj.noises[k_close] * (adv[k_close].to(sigma.dtype) / sigma).reshape(per_sample)

            def keep_half(k: int, j: int = j, shares=shares) -> None:
                shares[j, traj.math_step(k) - j - 1] = sketch.take()

            pathwise_sweep(model, traj, k_close, traj.step_index(min(j + max_h, T)), cot, options, counter,
                           after_step=keep_half)
    return Pieces(pathwise, half)


# ----------------------------------------------------------------------------------------------
# Variances from the pieces


@dataclass
class Stacked:
    """The pieces of N pilots stacked, as prefix sums over steps: a design's estimate is a few differences."""

    P: torch.Tensor  # (N, T + 1, d): P[:, f] = F-term of f steps
    L: dict  # baseline -> (N, T + 1, d): L[:, t] = sum of the likelihood ratios of steps 1..t
    L2: dict  # baseline -> (N, T + 1): the same sum of their squared norms
    H: dict  # baseline -> (N, T, max_h + 1, d): H[:, j, h] = H-term of (j, h)
    stochastic: torch.Tensor  # (T,) bool: sigma_t > 0 for t = 1..T
    pathwise: bool  # whether P holds pathwise shares (a differentiable reward) or zeros

    @classmethod
    def of(cls, pieces: list[Pieces], traj: Trajectory) -> "Stacked":
        def prefix(x: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = 1
            return torch.cat([x.new_zeros(shape), x.cumsum(dim)], dim)

        half = {b: torch.stack([p.half[b] for p in pieces]) for b in pieces[0].half}
        first = next(iter(half.values()))
        pathwise = torch.stack([p.pathwise for p in pieces]) if pieces[0].pathwise is not None else \
            first.new_zeros(first.shape[0], traj.num_steps, first.shape[-1])
        stochastic = torch.tensor([float(traj.sigmas[traj.step_index(t)]) > 0 for t in range(1, traj.num_steps + 1)])
        return cls(P=prefix(pathwise, 1), L={b: prefix(q[:, :, 0], 1) for b, q in half.items()},
                   L2={b: prefix(q[:, :, 0].pow(2).sum(-1), 1) for b, q in half.items()},
                   H={b: prefix(q, 2) for b, q in half.items()}, stochastic=stochastic,
                   pathwise=pieces[0].pathwise is not None)

    def terms(self, family: Family) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each j of the family (one row for zo and full_bp): the estimate given the chain with all of C
        (N, nJ, d), and the sum (N, nJ, d) and summed squared norms (N, nJ) of C's likelihood ratios."""
        T, f, h, b = self.P.shape[1] - 1, family.f, family.h, family.baseline
        if family.method == "full_bp":
            mu = self.P[:, T, None]
            return mu, torch.zeros_like(mu), mu.new_zeros(mu.shape[:2])
        L, L2 = self.L[b], self.L2[b]
        c_sum, c_sq = (L[:, T] - L[:, f])[:, None], (L2[:, T] - L2[:, f])[:, None]
        mu = self.P[:, f, None] + c_sum
        if family.method == "rlr":
            J = torch.tensor(family.js)
            c_sum = c_sum - (L[:, J + h] - L[:, J])
            c_sq = c_sq - (L2[:, J + h] - L2[:, J])
            mu = self.P[:, f, None] + self.H[b][:, J, h] + c_sum
        return mu, c_sum, c_sq


def family_variances(stacked: Stacked, family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace variance and its standard error, (nJ + 1, m) for rlr (the last row: j uniform) and (1, m)
    otherwise; column k - 1 subsamples k of the m steps of C (the last column: all of them).

    Given the chain, subsampling k of the m likelihood ratios x_t of C uniformly without replacement
    (weight m / k) adds m^2 (1/k - 1/m) S^2, S^2 = sum_t |x_t - mean|^2 / (m - 1); so V(k) is the
    variance over pilots of the full-C estimate plus the mean of that term. Every j gives an unbiased
    estimate with the same mean, so j uniform over the valid j has the mean of their variances.
    Per pilot i, a_i = N / (N - 1) |mu_i - mean mu|^2 + m^2 (1/k - 1/m) S_i^2: V is the mean of a_i
    (unbiased) and its standard error std(a_i) / sqrt(N).
    """
    mu, c_sum, c_sq = stacked.terms(family)
    n, m = mu.shape[0], family.m
    spread = (mu - mu.mean(0)).pow(2).sum(-1) * (n / (n - 1))  # (N, nJ)
    if m >= 2:
        s2 = ((c_sq - c_sum.pow(2).sum(-1) / m) / (m - 1)).clamp(min=0)
        ks = torch.arange(1, m + 1, dtype=torch.float64)
        a = spread[..., None] + s2[..., None] * (m * m / ks - m)  # (N, nJ, m)
    else:
        a = spread[..., None]
    if family.method == "rlr":
        a = torch.cat([a, a.mean(1, keepdim=True)], 1)
    return a.mean(0), a.std(0) / math.sqrt(n)


def step_variances(stacked: Stacked) -> dict:
    """Trace variance over the pilots of each step's pathwise share and likelihood ratio (per baseline),
    t = 1..T, and of the H-term by (h, j): {"pathwise": (T,) or None, "likelihood ratio": {b: (T,)},
    "half": {b: (max_h, T) over h = 1.. and j = 0..T-1}}; NaN where a term does not exist."""
    def var(x: torch.Tensor) -> torch.Tensor:
        return x.var(0).sum(-1)

    T, nan = stacked.P.shape[1] - 1, float("nan")
    closing = stacked.stochastic  # H of (j, h) and L_t exist where step j+1 = t has noise
    out = {"pathwise": var(stacked.P.diff(dim=1)) if stacked.pathwise else None,
           "likelihood ratio": {b: var(L.diff(dim=1)).masked_fill(~closing, nan) for b, L in stacked.L.items()},
           "half": {}}
    for b, H in stacked.H.items():
        table = var(H[:, :, 1:].transpose(1, 2))  # (max_h, T)
        exists = torch.tensor([[j + h <= T for j in range(T)] for h in range(1, H.shape[2])]) & closing
        out["half"][b] = table.masked_fill(~exists, nan)
    return out
