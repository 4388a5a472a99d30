"""aim_steps (docs/estimator.md §12.1): j and the zo_steps subsample aimed at a segment of the chain.

The distributions are checked exactly (j's q against the written mixture, the subsample's weights
against the inverse of each step's chance to be drawn) and by their draws (z-tests, thresholds from
the binomial standard error, Z_MAX = 4.5 over at most 12 cells: a false alarm below 1e-4); the
estimates stay unbiased on the linear-Gaussian toy (tests/test_estimators.py, `aimed` cases).
"""

import math

import pytest
import torch

import rlr_fast
from rlr_fast.options import EstimatorOptions
from rlr_fast.terms import aimed_steps, j_distribution, rlr_terms, valid_js, zo_terms
from rlr_fast.testing import TOY_SCHEDULE, LinearEps, make_scheduler

Z_MAX = 4.5
DRAWS = 20000


def _traj(steps=10):
    sched = make_scheduler(**TOY_SCHEDULE)
    model = LinearEps(sched.alphas_cumprod, 3)
    return rlr_fast.rollout(model, sched, torch.randn(2, 3, dtype=torch.float64), num_steps=steps, eta=1.0,
                            generator=torch.Generator().manual_seed(0))


def _z(count: int, n: int, p: float) -> float:
    return abs(count - n * p) / math.sqrt(n * p * (1 - p)) if 0 < p < 1 else float(count != n * p) * math.inf


def test_aimed_steps_follow_the_schedule_rule():
    # math step t = T - k for code index k; k / T in [0.3, 0.6) -> k = 3, 4, 5 at T = 10
    assert aimed_steps(10, (0.3, 0.6)) == {7, 6, 5}
    assert aimed_steps(10, None) == set()


@pytest.mark.slow
def test_j_distribution_is_the_written_mixture_and_is_drawn():
    traj = _traj()
    options = EstimatorOptions(method="rlr", h=2, aim_steps=(0.3, 0.6), aim_share=0.75)
    valid, aimed = valid_js(traj, 1, 2), aimed_steps(10, (0.3, 0.6))
    hits = [j for j in valid if {j + 1, j + 2} & aimed]
    q = j_distribution(valid, 2, aimed, 0.75)
    written = [0.25 / len(valid) + (0.75 / len(hits) if j in hits else 0.0) for j in valid]
    torch.testing.assert_close(q, torch.tensor(written, dtype=torch.float64))
    assert hits == [3, 4, 5, 6] and len(valid) == 8
    g = torch.Generator().manual_seed(1)
    drawn = [rlr_terms(traj, options, g).half_order[0] for _ in range(DRAWS)]
    assert max(_z(drawn.count(j), DRAWS, float(p)) for j, p in zip(valid, q)) < Z_MAX


@pytest.mark.parametrize("k, share", [(3, 0.7), (1, 0.8), (4, 0.99)])
@pytest.mark.slow
def test_each_subsampled_step_is_weighted_by_its_inverse_chance(k, share):
    """E[w_t 1{t drawn}] = 1 for every step of C: the weighted sum is unbiased for the full sum."""
    traj = _traj()
    options = EstimatorOptions(method="zo", zo_steps=k, aim_steps=(0.5, 1.0), aim_share=share)
    g = torch.Generator().manual_seed(2)
    every = zo_terms(traj, EstimatorOptions(method="zo")).zeroth_order  # C, without subsampling
    drawn = {t: 0 for t in every}
    weights = {}
    for _ in range(DRAWS):
        terms = zo_terms(traj, options, g)
        assert len(terms.zeroth_order) == k == len(terms.zo_weight)
        for t, w in zip(terms.zeroth_order, terms.zo_weight):
            drawn[t] += 1
            assert weights.setdefault(t, w) == w  # one weight per step: the inverse of its chance
    assert sorted(weights) == every
    for t, count in drawn.items():
        p = 1 / weights[t]
        assert _z(count, DRAWS, p) < Z_MAX, (t, count, p)
    aimed = aimed_steps(10, (0.5, 1.0))
    assert sum(drawn[t] for t in aimed if t in drawn) > sum(drawn[t] for t in drawn if t not in aimed)  # aimed


def test_aim_options_are_checked():
    with pytest.raises(ValueError, match="aim_steps"):
        EstimatorOptions(method="rlr", aim_steps=(0.6, 0.3))
    with pytest.raises(ValueError, match="leave j='uniform'"):
        EstimatorOptions(method="rlr", j=2, aim_steps=(0.0, 0.5))
    with pytest.raises(ValueError, match="aim_share"):
        EstimatorOptions(method="rlr", aim_share=1.0)
