"""Choosing the estimator from pilot rollouts: the design search of docs/estimator.md §13.

    d = rlr_fast.design(model, sampler, reward_fn, budget=None, pilots=16)
    d.options            # the chosen EstimatorOptions: concrete, `estimate` takes it
    print(d.table())     # per-step variances; candidates with variance, cost, variance x cost, memory
    d.save(out_dir)      # design.md and design.png

Every estimate an EstimatorOptions can describe without bias (rlr with any f, h, j distribution,
subsample size k and baseline; zo; full_bp) is a sum of per-step pieces, each one step's share of a
sweep the estimators run: the pathwise share P_t of every step (one sweep from dR/dx_0 over all T
steps) and, for every closing step j+1, the shares of the half-order sweep through j+1 .. j+max_h
(whose first share is step j+1's likelihood ratio L_t). One pass per baseline records them on each
pilot batch, so the trace variance of every candidate follows from the same pilots; the model runs
only in rlr_fast.sweep. Long gradients are kept as count sketches, whose inner products are the
full vectors' in expectation, so traces stay unbiased at any LoRA size.

    space.py    the candidates (families of unbiased designs) and the cost model
    pieces.py   recording the per-step shares; the variances that follow from them
    search.py   design(): pilots in, the best variance x cost within the budgets out
    report.py   the markdown report and the PNG of per-step variances
"""

from .pieces import GradSketch, Pilot, record_pieces
from .search import Design, design
from ..costs import CostModel
from .space import DESIGN_FIELDS, Candidate, Family, families

__all__ = ["Candidate", "CostModel", "DESIGN_FIELDS", "Design", "Family", "GradSketch", "Pilot", "design", "families",
           "record_pieces"]
