"""Which steps of a stored chain get which estimator term (docs/estimator.md §4, §5, §8, §12.1).

RLR, full backprop, truncated backprop and the pure likelihood-ratio estimator differ only in which
steps get which term, so each is one `Terms` plan (rlr_fast.estimators runs it):
  F = {1..f}       pathwise from dR/dx_0 (sigma_t = 0 steps must be here or in H)
  H = {j+1..j+h}   likelihood ratio at step j+1, back-propagated through steps j+2..j+h
  C = the rest     likelihood ratio per step, optionally k of |C| with weight |C| / k
Steps are named as in docs/estimator.md: t = 1 .. T, t = 1 the last (x_1 -> x_0). The options were
validated against T already; what is checked here depends on the trajectory itself: which of its
steps are deterministic (sigma = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .options import EstimatorOptions
from .rollout import Trajectory


@dataclass
class Terms:
    """Which steps (docs/estimator.md indices t) get which estimator term."""

    first_order: int = 0  # f: pathwise over t = 1..f
    half_order: Optional[tuple[int, int]] = None  # (j, h): the sub-chain t = j+1..j+h
    zeroth_order: list[int] = field(default_factory=list)  # C, after any subsampling
    zo_weight: Union[float, list[float]] = 1.0  # |C| / k, or one weight per step of C with aim_steps


def deterministic_steps(traj: Trajectory) -> list[int]:
    """docs/estimator.md indices t of steps with sigma_t = 0."""
    return [traj.math_step(k) for k in range(traj.num_steps) if float(traj.sigmas[k]) == 0.0]


def valid_js(traj: Trajectory, f: int, h: int) -> list[int]:
    """Start indices j of the half-order sub-chain for which RLR is defined.

    j in {f..T-h} such that step j+1 (closed by a likelihood ratio) has sigma > 0 and no
    sigma = 0 step falls in C.
    """
    det = set(deterministic_steps(traj))
    return [j for j in range(f, traj.num_steps - h + 1)
            if j + 1 not in det and all(t <= f or j + 1 <= t <= j + h for t in det)]


def _draw(generator: Optional[torch.Generator], n: int) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def aimed_steps(num_steps: int, aim: Optional[tuple[float, float]]) -> set[int]:
    """The math steps t whose code index k = T - t has from <= k / T < to (a prompt_schedule segment's
    rule); empty without an aim."""
    if aim is None:
        return set()
    return {num_steps - k for k in range(num_steps) if aim[0] <= k / num_steps < aim[1]}


def j_distribution(valid: list[int], h: int, aimed: set[int], share: float) -> torch.Tensor:
    """q(j) over `valid`: `share` spread evenly on the j whose sub-chain j+1..j+h meets the aimed
    steps, the rest on all valid j (uniform when none meets them). Any q is unbiased (§4.2)."""
    q = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
    hits = torch.tensor([any(j + i in aimed for i in range(1, h + 1)) for j in valid])
    if hits.any():
        q = (1 - share) * q + share * hits.double() / hits.sum()
    return q


def _choose_j(j, valid: list[int], generator, aim: Optional[tuple[int, set[int], float]] = None) -> int:
    if aim is not None:
        return valid[int(torch.multinomial(j_distribution(valid, *aim), 1, generator=generator))]
    if j == "uniform":
        return valid[_draw(generator, len(valid))]
    if isinstance(j, int):
        if j not in valid:
            raise ValueError(f"j={j} is not a valid start for this trajectory's deterministic steps "
                             f"(valid: {valid})")
        return j
    weights = torch.as_tensor(j, dtype=torch.float64)  # a weight per j = 0 .. len - 1
    outside = [i for i in range(weights.numel()) if weights[i] > 0 and i not in valid]
    if outside:
        raise ValueError(f"j weights must be zero outside the valid j {valid} of this trajectory; "
                         f"got weight on {outside}")
    return int(torch.multinomial(weights, 1, generator=generator))


def _subsample(steps: list[int], k: Optional[int], generator) -> tuple[list[int], float]:
    """k of the steps uniformly without replacement, each weighted |C| / k (unbiased)."""
    if k is None or k == len(steps):
        return steps, 1.0
    perm = torch.randperm(len(steps), generator=generator)[:k]
    return sorted(steps[i] for i in perm.tolist()), len(steps) / k


def _aimed_subsample(steps: list[int], k: Optional[int], aimed: set[int], share: float,
                     generator) -> tuple[list[int], Union[float, list[float]]]:
    """k of the steps, about `share` of them among the aimed ones: uniform without replacement within
    the aimed and the other steps (k_a and k - k_a of them, both >= 1), each weighted by the inverse of
    its chance to be drawn, |A| / k_a or |B| / k_b (with k = 1: one group drawn with chance share,
    then one step of it), so the sum stays unbiased (docs/estimator.md §12.1)."""
    inside = [t for t in steps if t in aimed]
    outside = [t for t in steps if t not in aimed]
    if k is None or k == len(steps) or not inside or not outside:
        return _subsample(steps, k, generator)
    if k == 1:
        group, chance = (inside, share) if float(torch.rand((), generator=generator, dtype=torch.float64)) < share \
            else (outside, 1 - share)
        return [group[_draw(generator, len(group))]], [len(group) / chance]
    k_in = min(max(round(share * k), 1), k - 1, len(inside))
    k_in = k - min(k - k_in, len(outside))
    chosen = {}
    for group, n in ((inside, k_in), (outside, k - k_in)):
        for t in _subsample(group, n, generator)[0]:
            chosen[t] = len(group) / n
    ts = sorted(chosen)
    return ts, [chosen[t] for t in ts]


def rlr_terms(traj: Trajectory, options: EstimatorOptions, generator=None) -> Terms:
    """F, H and C of one RLR estimate."""
    T, f, h = traj.num_steps, options.first_order_steps, options.h
    valid = valid_js(traj, f, h)
    if not valid:
        raise ValueError(f"no valid j for first_order_steps={f}, h={h}: deterministic steps (sigma=0) "
                         f"t={deterministic_steps(traj)} must lie in F = 1..f or H, and step j+1 needs sigma > 0; "
                         "raise first_order_steps (or eta)")
    aimed = aimed_steps(T, options.aim_steps)
    j = _choose_j(options.j, valid, generator, (h, aimed, options.aim_share) if aimed else None)
    rest = [t for t in range(1, T + 1) if t > f and not j + 1 <= t <= j + h]
    chosen, weight = _aimed_subsample(rest, options.zo_steps, aimed, options.aim_share, generator)
    return Terms(first_order=f, half_order=(j, h), zeroth_order=chosen, zo_weight=weight)


def zo_terms(traj: Trajectory, options: EstimatorOptions, generator=None) -> Terms:
    """Likelihood ratio on every step above the last deterministic one, pathwise below it."""
    f = max(deterministic_steps(traj), default=0)
    stochastic = list(range(f + 1, traj.num_steps + 1))
    if options.zo_steps is not None and options.zo_steps > len(stochastic):
        raise ValueError(f"zo_steps={options.zo_steps} exceeds the {len(stochastic)} steps after this "
                         f"trajectory's last deterministic step (t={f})")
    chosen, weight = _aimed_subsample(stochastic, options.zo_steps, aimed_steps(traj.num_steps, options.aim_steps),
                                      options.aim_share, generator)
    return Terms(first_order=f, zeroth_order=chosen, zo_weight=weight)


def choose_terms(traj: Trajectory, options: EstimatorOptions, generator) -> Terms:
    """The terms of one estimate of `options.method` (rlr, zo, full_bp or truncated_bp) on `traj`."""
    if options.method == "rlr":
        return rlr_terms(traj, options, generator)
    if options.method == "zo":
        return zo_terms(traj, options, generator)
    if options.method == "full_bp":
        return Terms(first_order=traj.num_steps)
    # truncated_bp: pathwise over the last K steps only (AlignProp / DRaFT-K): biased, for comparison
    k = options.truncated_bp_k
    return Terms(first_order=1 + _draw(generator, traj.num_steps) if k == "random" else k)


def likelihood_ratio_steps(traj: Trajectory, terms: Terms) -> list[int]:
    """Steps k (ascending) that carry a likelihood ratio: C, and the closing step j+1 of H."""
    ts = list(terms.zeroth_order) + ([terms.half_order[0] + 1] if terms.half_order is not None else [])
    return sorted(traj.step_index(t) for t in ts)
