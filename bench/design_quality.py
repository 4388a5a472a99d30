"""How close rlr_fast.design's choice comes to the best of every unbiased design, by number of pilots.

    python bench/design_quality.py            # the full run (about 15 CPU-minutes on one thread)
    python bench/design_quality.py --quick    # tiny sizes, prints only (the smoke test's run)

On the linear-Gaussian toy (rlr_fast.testing: T = 6, B = 4, baselines none and loo, sub-chains up to
h = T), every unbiased design (rlr with any f, h, j and k; zo; full_bp) is measured on M independent
batches against the closed-form gradient (rlr_fast.testing.measure_design_grid). For each schedule,
budget and number of pilots, `repeats` designs are made from fresh pilots; each choice's measured
variance x cost is divided by the least of the grid within the budget (1 = the best design).
Columns: that ratio's mean, median and maximum over the repeats, the share above 1.2, the median of
the design's own estimate of its variance x cost over the measured one (below 1: optimistic), and the
cost of one design call (forward-equivalents, median seconds).

Results: bench/results/design_quality.md and .csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common, a source tree

from bench.common import current_device, write_results  # noqa: E402

import rlr_fast  # noqa: E402
from rlr_fast.costs import CostModel, Work  # noqa: E402
from rlr_fast.testing import (TOY_SCHEDULE, LinearEps, make_scheduler, measure_design_grid,  # noqa: E402
                              quadratic_reward)

TARGET = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
BASELINES = ("none", "loo")
# TOY_SCHEDULE's own spacing ends with a deterministic step (sigma_1 = 0); trailing spacing keeps every
# step stochastic, with sigma_1 = 0.14: a noisier likelihood ratio at t = 1, hence heavier-tailed pilots.
SCHEDULES = {"TOY_SCHEDULE": {}, "TOY_SCHEDULE trailing": {"timestep_spacing": "trailing"}}


def rows_for(schedule: str, *, steps: int, batch: int, batches: int, pilots: list[int], budgets: list, repeats: int,
             seed: int = 0) -> list[dict]:
    sched = make_scheduler(**TOY_SCHEDULE, **SCHEDULES[schedule])
    model, costs = LinearEps(sched.alphas_cumprod, 3), CostModel()
    grid = measure_design_grid(model, sched, num_steps=steps, batches=batches, batch_size=batch, baselines=BASELINES,
                               target=TARGET, seed=seed + 99_999)
    g = torch.Generator().manual_seed(seed)

    def pilot():
        return rlr_fast.rollout(model, sched, torch.randn(batch, 3, generator=g, dtype=torch.float64),
                                num_steps=steps, eta=1.0, generator=g)

    rows = []
    for recomputed in budgets:
        budget = None if recomputed is None else costs.forward_equivalents(Work(steps, recomputed, 0, 0, 1, 1))
        best = min(v.efficiency for v in grid.values() if budget is None or v.cost <= budget + 1e-9)
        for n in pilots:
            ratios, optimism, seconds, fe = [], [], [], 0.0
            for _ in range(repeats):
                d = rlr_fast.design(model, pilot, quadratic_reward(TARGET), pilots=n, budget=budget, max_h=steps,
                                    baselines=BASELINES, progress=False)
                measured = grid[d.chosen.key].efficiency
                ratios.append(measured / best)
                optimism.append(d.chosen.efficiency / measured)
                seconds.append(d.pilot_cost["seconds"])
                fe = d.pilot_cost["forward_equivalents"]
            row = dict(schedule=schedule, T=steps, B=batch, M=batches,
                       budget="none" if budget is None else f"{budget:g} ({recomputed} steps)", pilots=n,
                       repeats=repeats, ratio_mean=statistics.fmean(ratios), ratio_median=statistics.median(ratios),
                       ratio_max=max(ratios), share_above_1_2=sum(r > 1.2 for r in ratios) / repeats,
                       estimate_over_measured=statistics.median(optimism), design_forward_equivalents=fe,
                       design_seconds=statistics.median(seconds))
            rows.append(row)
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3000, help="M: batches measuring every design")
    parser.add_argument("--repeats", type=int, default=20, help="designs per number of pilots")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, print only (smoke test)")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/design_quality.py", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(1)
    sizes = dict(steps=6, batch=4, batches=args.batches, pilots=[4, 8, 16, 32, 64], budgets=[3, 4, None],
                 repeats=args.repeats)
    if args.quick:
        sizes.update(steps=4, batches=200, pilots=[3], budgets=[2, None], repeats=2)
    start = time.perf_counter()
    rows = [row for schedule in SCHEDULES for row in rows_for(schedule, **sizes)]
    if not args.quick:
        header = [
            "# Quality of the automatic estimator design", "", f"Command: `{command}`", "",
            f"Device: {current_device(force_cpu=True).name}; torch {torch.__version__}; CPU only. Total wall clock "
            f"{time.perf_counter() - start:.0f} s.", "",
            __doc__.split("\n\n", 2)[2].split("\n\nResults")[0].replace("\n", " "), "",
            "Budget: the most forward-equivalents one update may cost (rollout 6, 2.15 per recomputed step, reward "
            "1 + 2 for dR/dx_0); 'none' lets full_bp in.",
        ]
        csv_path, md_path = write_results("design_quality", rows, "\n".join(header))
        print(f"wrote {md_path} and {csv_path}")
    return rows


if __name__ == "__main__":
    main()
