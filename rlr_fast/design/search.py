"""The search: pilots in, the candidate with the least variance x cost within the budgets out."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..options import MEMORY_OPTIONS, EstimatorOptions, check_min, check_positive
from ..rollout import Trajectory
from ..sweep import CallCounter, gradient_checkpointing
from .pieces import GradSketch, Pilot, RewardFn, Stacked, family_variances, record_pieces, step_variances
from ..costs import CostModel, Work, work
from .space import DESIGN_FIELDS, Candidate, Family, families


def _candidates(stacked: Stacked, family: Family, T: int, costs: CostModel, budget: Optional[float],
                base: EstimatorOptions, memory_gib: Optional[float]) -> Iterator[Candidate]:
    """Per j choice of the family, the subsample size k with the least variance x cost within the budget."""
    variance, se = family_variances(stacked, family)
    ks = list(range(1, family.m + 1)) or [0]  # column c subsamples ks[c]; the last uses all m steps
    js = list(family.js) + ["uniform"] if family.method == "rlr" else [None]
    # the cost does not depend on j: price each k with the family's first j
    done = [work(family.options(js[0], k if 0 < k < family.m else None, base), T,
                 deterministic=family.f if family.method == "zo" else 0)
            for k in ks]
    unet = [costs.unet(w, base.checkpoint_unet) for w in done]
    reward = [costs.rewards(w) for w in done]
    cost = torch.tensor(unet, dtype=torch.float64) + torch.tensor(reward, dtype=torch.float64)
    affordable = cost <= (math.inf if budget is None else budget)
    if not affordable.any():
        return
    score = (variance * cost).masked_fill(~affordable, math.inf)
    for row, j in enumerate(js):
        c = int(score[row].argmin())
        yield Candidate(family, j, ks[c] if ks[c] < family.m else None, float(variance[row, c]), float(se[row, c]),
                        unet[c], reward[c], base, memory_gib)


def _plan_memory(config, options: EstimatorOptions, max_memory_gb: float):
    """rlr_fast.plan for the run `config` running `options`: its Plan, or None when nothing fits the budget."""
    from ..plan import PlanError, plan

    try:
        return plan(config.with_overrides({name: getattr(options, name) for name in DESIGN_FIELDS}), max_memory_gb)
    except PlanError:
        return None


def _pilots(sampler, pilots: Optional[int], reward_fn: Optional[RewardFn]) -> tuple[int, Iterator[Pilot]]:
    """How many pilot batches there are, and the batches one at a time (a sampler's are drawn as they are
    swept, so one is in memory at a time), each checked: a Trajectory with a reward, of pilot 0's schedule."""
    if callable(sampler) and not isinstance(sampler, Trajectory):
        if isinstance(pilots, bool) or not isinstance(pilots, int) or pilots < 2:
            raise ValueError(f"pilots must be an int >= 2 (pilot batches drawn from the sampler), got {pilots!r}")
        count, items = pilots, (sampler() for _ in range(pilots))
    elif isinstance(sampler, (list, tuple)):
        if len(sampler) < 2:
            raise ValueError(f"design needs at least 2 pilot trajectories to estimate a variance, got {len(sampler)}")
        count, items = len(sampler), iter(sampler)
    else:
        raise TypeError("sampler must be a callable returning a Trajectory (or a Pilot), or a list of them; got "
                        f"{type(sampler).__name__}")

    def checked() -> Iterator[Pilot]:
        first = None
        for i, item in enumerate(items):
            p = item if isinstance(item, Pilot) else Pilot(item)
            if not isinstance(p.traj, Trajectory):
                raise TypeError(f"pilot {i} is a {type(p.traj).__name__}, not a Trajectory from rlr_fast.rollout")
            if (p.reward_fn or reward_fn) is None:
                raise ValueError(f"pilot {i} has no reward_fn and design was given none")
            first = first or p.traj
            if p.traj.num_steps != first.num_steps or not torch.equal(p.traj.sigmas.cpu(), first.sigmas.cpu()):
                raise ValueError(f"pilot {i} was sampled with another schedule than pilot 0 ({p.traj.num_steps} "
                                 f"steps, sigmas {p.traj.sigmas.tolist()} vs {first.num_steps}, "
                                 f"{first.sigmas.tolist()})")
            yield Pilot(p.traj, p.reward_fn, None if p.prompt_ids is None else torch.as_tensor(p.prompt_ids))

    return count, checked()


def _baselines(baselines: Optional[Sequence], pilot: Pilot) -> tuple:
    """The baselines asked for, checked; by default none and loo, and loo_prompt when the (first) pilot
    has two or more samples of every prompt."""
    if baselines is None:
        if pilot.traj.batch_size < 2:
            return ("none",)
        ids = pilot.prompt_ids
        per_prompt = ids is not None and bool((torch.unique(ids, return_counts=True)[1] >= 2).all())
        return ("none", "loo") + (("loo_prompt",) if per_prompt else ())
    baselines = tuple(baselines)
    if not baselines:
        raise ValueError("baselines must name at least one baseline")
    for b in baselines:
        EstimatorOptions(baseline=b)  # a ValueError/TypeError naming a bad one
    return baselines


@dataclass
class Design:
    """The chosen estimator, every candidate the search scored, and what the pilots measured.

    `table()` is the markdown report, `plot(path)` the PNG of per-step variances, `save(out_dir)` both.
    """

    chosen: Candidate
    candidates: list  # every Candidate scored (per family and j, the best k), best variance x cost first
    variances: dict  # pieces.step_variances of the pilots
    sigmas: list  # sigma_t, t = 1..T
    num_pilots: int
    batch_size: int
    baselines: tuple
    max_h: int
    sketch: str  # how the gradients were kept (exact, or a count sketch)
    budget: Optional[float]
    max_memory_gb: Optional[float]
    costs: CostModel
    pilot_cost: dict  # what the design call spent: rollouts, recomputed steps, model and reward calls, seconds
    memory: Optional[dict] = None  # the chosen design's memory plan as Config keys, when a budget was given

    @property
    def options(self) -> EstimatorOptions:
        return self.chosen.options

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def config_overrides(self) -> dict:
        """The chosen design (and its memory plan) as Config keys: `cfg.with_overrides(...)` runs it."""
        options = self.options
        chosen = {name: getattr(options, name) for name in DESIGN_FIELDS + MEMORY_OPTIONS}
        return {**chosen, **(self.memory or {})}

    def summary(self) -> dict:
        """The choice and its figures, JSON-ready (what finetune logs)."""
        c = self.chosen
        used = {"full_bp": ("method",), "zo": ("method", "zo_steps", "baseline")}.get(c.family.method, DESIGN_FIELDS)
        return {"design": {name: getattr(self.options, name) for name in used}, "label": c.label(),
                "variance": c.variance, "variance_se": c.variance_se, "cost": c.cost,
                "variance_x_cost": c.efficiency, "pilot_cost": dict(self.pilot_cost)}

    def table(self, top: int = 12) -> str:
        from .report import markdown

        return markdown(self, top)

    def plot(self, path) -> Path:
        from .report import plot

        return plot(self, Path(path))

    def save(self, out_dir, name: str = "design") -> tuple[Path, Path]:
        """out_dir/<name>.md and out_dir/<name>.png, written atomically."""
        from ..run_dir import atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = atomic_write(out / f"{name}.md", lambda tmp: tmp.write_text(self.table(), encoding="utf-8"))
        return md, self.plot(out / f"{name}.png")


def design(model, sampler, reward_fn: Optional[RewardFn] = None, *, budget: Optional[float] = None,
           max_memory_gb: Optional[float] = None, config=None, pilots: Optional[int] = 16,
           baselines: Optional[Sequence] = None, max_h: int = 4, options: Optional[EstimatorOptions] = None,
           costs: Optional[CostModel] = None, differentiable: Optional[bool] = None, sketch_dim: int = 1024,
           seed: int = 0, progress: bool = True) -> Design:
    """Choose the unbiased estimator with the least variance x cost from a few pilot batches.

    model       the model `estimate` will train (its trainable parameters' .grad is left as found)
    sampler     a callable returning one pilot batch (a Trajectory, or a Pilot with its own reward_fn and
                prompt_ids), called `pilots` times; or a list of them (then `pilots` is ignored)
    reward_fn   R(x_0) -> (B,), for pilots without their own
    budget      the most one update may cost, in UNet forward-equivalents of the batch (rollout and reward
                included, priced by `costs`); None: no limit
    max_memory_gb, config   a memory budget in GiB: `config`, the run's rlr_fast Config (its `model` names
                the architectures), is planned by rlr_fast.plan for each kind of design, and designs that fit
                no plan are left out; the chosen one's memory options come with it (`config_overrides()`)
    baselines   baselines to compare (default: none, loo, and loo_prompt when every pilot has prompt_ids
                with at least two samples per prompt); each costs one half-order pass per pilot
    max_h       the longest half-order sub-chain tried; a pilot recomputes T + about T * max_h steps per
                baseline
    options     the fields a design does not choose (backend, max_batch, checkpoint_unet, split_cfg);
                default: those of `config`, else EstimatorOptions' defaults
    differentiable  whether dR/dx_0 exists (default: reward_fn's `differentiable` attribute, else True);
                without it only f = 0 designs are candidates
    sketch_dim  gradients with more values are count-sketched to this many (traces stay unbiased)
    seed        the sketch's hashes

    Raises ValueError (or TypeError) naming a bad value, or when no candidate fits the budgets.
    """
    started = time.perf_counter()
    params, costs = _check_arguments(model, budget, max_memory_gb, config, max_h, sketch_dim, costs)
    base = _fixed_options(options if options is not None else config)
    if differentiable is None:
        differentiable = bool(getattr(reward_fn, "differentiable", True))

    sketch, counter = GradSketch(params, sketch_dim, seed), CallCounter()
    pieces, traj, baselines, max_h = _record_pilots(model, params, sampler, pilots, reward_fn, baselines, max_h,
                                                    sketch, base, counter, differentiable, progress)
    stacked = Stacked.of(pieces, traj)
    plan_memory = None if max_memory_gb is None else (lambda opts: _plan_memory(config, opts, max_memory_gb))
    scored, plans = _score(stacked, traj, baselines, max_h, differentiable, costs, budget, base, plan_memory)
    if not scored:
        _refuse(budget, max_memory_gb, traj)
    chosen = scored[0]
    planned = plans.get(_memory_kind(chosen.family))
    n = len(pieces)
    pilot_cost = dict(_pilot_work(n, traj, sketch, counter, costs, base, differentiable),
                      seconds=time.perf_counter() - started)
    return Design(chosen=chosen, candidates=scored, variances=step_variances(stacked),
                  sigmas=[float(traj.sigmas[traj.step_index(t)]) for t in range(1, traj.num_steps + 1)],
                  num_pilots=n, batch_size=traj.batch_size, baselines=baselines, max_h=max_h,
                  sketch=sketch.describe(), budget=budget, max_memory_gb=max_memory_gb, costs=costs,
                  pilot_cost=pilot_cost, memory=None if planned is None else {
                      k: v for k, v in planned.config_overrides().items()
                      if k not in MEMORY_OPTIONS})


def _fixed_options(source) -> EstimatorOptions:
    """The options a design does not choose, from `source` (options or a Config; None: the defaults)."""
    return EstimatorOptions.build(None, **({} if source is None else {
        n: getattr(source, n) for n in EstimatorOptions.names() if n not in DESIGN_FIELDS + ("normalize",)}))


def _record_pilots(model, params, sampler, pilots, reward_fn, baselines, max_h: int, sketch: GradSketch,
                   base: EstimatorOptions, counter: CallCounter, differentiable: bool, progress: bool) -> tuple:
    """Every pilot's per-step pieces (one pilot in memory at a time), with pilot 0's chain and the baselines
    and max_h it settles; the parameters' .grad is left as found."""
    count, batches = _pilots(sampler, pilots, reward_fn)
    saved, pieces = [p.grad for p in params], []
    try:
        with gradient_checkpointing(model, base.checkpoint_unet):
            for pilot in _progress(batches, count, progress):
                if not pieces:
                    traj = pilot.traj
                    baselines = _baselines(baselines, pilot)
                    max_h = min(max_h, traj.num_steps)
                pieces.append(record_pieces(model, pilot, reward_fn, baselines, max_h, sketch, base, counter,
                                            differentiable))
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return pieces, traj, baselines, max_h


def _pilot_work(n: int, traj: Trajectory, sketch: GradSketch, counter: CallCounter, costs: CostModel,
                base: EstimatorOptions, differentiable: bool) -> dict:
    """What the n pilots cost: rollouts, recomputed steps, model and reward calls, forward-equivalents."""
    rollouts = n * traj.num_steps
    return dict(pilots=n, rollout_forward_equivalents=rollouts, recomputed_steps=sketch.taken,
                unet_forward=counter.forward, unet_backward=counter.backward, reward_forward=n,
                reward_backward=n if differentiable else 0,
                forward_equivalents=rollouts + n * costs.forward_equivalents(
                    Work(0, sketch.taken / n, 0, 0, 1, int(differentiable)), base.checkpoint_unet))


def _refuse(budget, max_memory_gb, traj: Trajectory):
    """The one-line reason no candidate is left."""
    why = [] if budget is None else [f"budget={budget:g} forward-equivalents (the rollout alone costs "
                                     f"{traj.num_steps})"]
    why += [] if max_memory_gb is None else [f"max_memory_gb={max_memory_gb:g}"]
    if not why:  # no candidate at all: every step deterministic and no dR/dx_0
        raise ValueError("no unbiased design exists for this chain: its deterministic steps need dR/dx_0 (a "
                         "differentiable reward) or noise (eta > 0)")
    raise ValueError(f"no unbiased design fits {' and '.join(why)}; raise it")


def _progress(items: Iterator, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="design: pilot batches", unit="pilot", disable=not enabled, leave=False)


def _check_arguments(model, budget, max_memory_gb, config, max_h, sketch_dim, costs) -> tuple[list, CostModel]:
    """The model's trainable parameters and the cost model (default: CostModel()), once design's arguments
    are checked (the pilots are checked as they are drawn): a ValueError (or TypeError) names a bad one."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    if budget is not None:
        check_positive("budget", budget)
    if max_memory_gb is not None:
        check_positive("max_memory_gb", max_memory_gb)
        if config is None:
            raise ValueError("max_memory_gb needs config=, the run's rlr_fast Config: the planner measures the "
                             "architectures of its model")
    check_min("max_h", max_h, 1)
    check_min("sketch_dim", sketch_dim, 1)
    costs = CostModel() if costs is None else costs
    if not isinstance(costs, CostModel):
        raise TypeError(f"costs must be a rlr_fast.design.CostModel, got {type(costs).__name__}")
    return params, costs


def _memory_kind(family: Family) -> tuple:
    # what sets an update's peak: pathwise steps (input gradients), likelihood-ratio chunks, dR/dx_0
    return family.method, family.f > 0


def _score(stacked: Stacked, traj: Trajectory, baselines: tuple, max_h: int, differentiable: bool, costs: CostModel,
           budget: Optional[float], base: EstimatorOptions, plan_memory) -> tuple[list, dict]:
    """Every family's candidates within the budgets, best variance x cost first, and the memory plan of
    each kind of design. `plan_memory(options)` is a Plan, or None when nothing fits; without it
    (no memory budget) every design runs with `base`'s memory options."""
    plans: dict = {}
    scored = []
    for family in families(traj, baselines, max_h, differentiable):
        kind = _memory_kind(family)
        if plan_memory is not None and kind not in plans:
            plans[kind] = plan_memory(family.options(family.js[0] if family.js else None, None, base))
        planned = plans.get(kind)
        if plan_memory is not None and planned is None:
            continue
        kind_base = base if planned is None else EstimatorOptions.build(
            base, **{n: planned.options[n] for n in ("max_batch", "checkpoint_unet", "split_cfg")})
        scored += _candidates(stacked, family, traj.num_steps, costs, budget, kind_base,
                              None if planned is None else planned.peak_gib)
    scored.sort(key=lambda c: c.efficiency)
    return scored, plans
