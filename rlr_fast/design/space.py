"""The design space: every unbiased estimator `estimate` can run, grouped into families, and its cost
(rlr_fast.costs prices it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from ..terms import deterministic_steps, valid_js
from ..options import EstimatorOptions
from ..rollout import Trajectory

# The estimator fields a design chooses; every other field (backend, max_batch, ...) comes from the caller.
DESIGN_FIELDS = ("method", "first_order_steps", "h", "j", "zo_steps", "baseline")


@dataclass(frozen=True)
class Family:
    """Unbiased designs sharing method, f, h and baseline: every j distribution and subsample size k.

    rlr: F = 1..f, H = j+1..j+h for j in `js` (each alone, or uniform over them), C the m = T - f - h
    other steps; zo: F = 1..f (its deterministic steps), C the m others; full_bp: F = all.
    """

    method: str
    f: int
    h: int  # 0 for zo and full_bp
    js: tuple[int, ...]  # rlr: the valid j (terms.valid_js)
    m: int  # |C|
    baseline: Union[str, float, None]  # None for full_bp (no likelihood ratio)

    def choices(self) -> Iterator[tuple[Union[int, str, None], Optional[int]]]:
        """Every (j, zo_steps) of the family; zo_steps None uses all m steps."""
        ks = [None] + list(range(1, self.m))
        for j in (list(self.js) + ["uniform"] if self.method == "rlr" else [None]):
            for k in ks:
                yield j, k

    def options(self, j, k, base: Optional[EstimatorOptions] = None) -> EstimatorOptions:
        fields = dict(method=self.method, zo_steps=k, normalize=False, baseline="none" if self.baseline is None
                      else self.baseline)
        if self.method == "rlr":
            fields.update(first_order_steps=self.f, h=self.h, j=j)
        return EstimatorOptions.build(base, **fields)


def families(traj: Trajectory, baselines: Sequence, max_h: int, differentiable: bool) -> Iterator[Family]:
    """The design space on `traj`'s chain: only unbiased estimators (never truncated_bp, ddpo or a
    batch-normalised scale), only j that `terms.valid_js` accepts, f > 0 only with a
    differentiable reward, and a deterministic step never left to a likelihood ratio."""
    T = traj.num_steps
    det = deterministic_steps(traj)
    if differentiable:
        yield Family("full_bp", T, 0, (), 0, None)
    f_zo = max(det, default=0)
    if f_zo < T and (differentiable or f_zo == 0):
        for b in baselines:
            yield Family("zo", f_zo, 0, (), T - f_zo, b)
    for f in range(0, T if differentiable else 1):
        for h in range(1, min(max_h, T - f) + 1):
            js = tuple(valid_js(traj, f, h))
            if js:
                for b in baselines:
                    yield Family("rlr", f, h, js, T - f - h, b)


@dataclass(frozen=True)
class Candidate:
    """One design (a family's j and zo_steps) with its estimated trace variance, its standard error and
    its cost per update."""

    family: Family
    j: Union[int, str, None]
    zo_steps: Optional[int]
    variance: float
    variance_se: float
    unet_cost: float  # UNet forward-equivalents, rollout included
    reward_cost: float  # reward evaluations, in UNet forward-equivalents
    base: Optional[EstimatorOptions] = None  # the fields a design does not choose (backend, max_batch, ...)
    memory_gib: Optional[float] = None  # the planner's estimated peak, when a memory budget was given

    @property
    def options(self) -> EstimatorOptions:
        return self.family.options(self.j, self.zo_steps, self.base)

    @property
    def key(self) -> tuple:
        """(method, f, h, j, zo_steps, baseline): the design, whatever its memory options."""
        fam = self.family
        return fam.method, fam.f, fam.h, self.j, self.zo_steps, fam.baseline

    @property
    def cost(self) -> float:
        return self.unet_cost + self.reward_cost

    @property
    def efficiency(self) -> float:
        """variance x cost: what averaging estimates down to a given variance costs (docs/estimator.md §9)."""
        return self.variance * self.cost

    def label(self) -> str:
        fam, k = self.family, "all" if self.zo_steps is None else self.zo_steps
        if fam.method == "full_bp":
            return "full_bp"
        if fam.method == "zo":
            return f"zo k={k} b={fam.baseline}"
        return f"rlr f={fam.f} h={fam.h} j={self.j} k={k} b={fam.baseline}"
