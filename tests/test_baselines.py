"""Baselines, scales and DDPO's advantages on small hand-checked batches (their unbiasedness inside
an estimate is tested in test_estimators.py)."""

import pytest
import torch

from rlr_fast.baselines import ValueStatistics, ddpo_advantages, reward_baseline, reward_scale, value_baseline
from rlr_fast.options import EstimatorOptions

R = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
PROMPTS = torch.tensor([0, 1, 0, 1])


def _b(baseline, prompt_ids=None, rewards=R):
    return reward_baseline(rewards, EstimatorOptions(baseline=baseline), prompt_ids)


def test_baselines_by_hand():
    assert _b("none").tolist() == [0, 0, 0, 0]
    assert _b(0.5).tolist() == [0.5] * 4
    assert _b("loo").tolist() == [13 / 3, 12 / 3, 10 / 3, 7 / 3]  # mean of the other three
    assert _b("loo_prompt", PROMPTS).tolist() == [4.0, 7.0, 1.0, 2.0]  # the other sample of the same prompt
    three = torch.tensor([0, 0, 0, 1, 1])
    r = torch.tensor([1.0, 2.0, 6.0, 3.0, 5.0])
    assert _b("loo_prompt", three, r).tolist() == [4.0, 3.5, 1.5, 5.0, 3.0]


def test_baseline_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 samples"):
        _b("loo", rewards=R[:1])
    with pytest.raises(ValueError, match=r"needs prompt_ids, one id per sample \(shape \(4,\)\), got None"):
        _b("loo_prompt")
    with pytest.raises(ValueError, match=r"prompt ids \[2\] have one"):
        _b("loo_prompt", torch.tensor([0, 0, 2, 1, 1]), torch.arange(5.0))


def test_scales():
    assert reward_scale(R, EstimatorOptions()) == 1.0
    assert reward_scale(R, EstimatorOptions(normalize=4.0)) == 4.0
    # unbiased sample std: deviations -2.5, -1.5, 0.5, 3.5 from 3.5 -> sqrt(21 / 3)
    assert reward_scale(R, EstimatorOptions(normalize=True)) == pytest.approx(7 ** 0.5, rel=1e-12)
    assert reward_scale(torch.full((4,), 2.0), EstimatorOptions(normalize=True)) == 1.0  # no spread: no rescaling


def test_ddpo_advantages_are_standardised_per_prompt():
    per_prompt = ddpo_advantages(R, PROMPTS)
    # prompt 0: rewards 1, 4 -> mean 2.5, std 2.121; prompt 1: 2, 7 -> mean 4.5, std 3.536
    expected = [-1.5 / 4.5 ** 0.5, -2.5 / 12.5 ** 0.5, 1.5 / 4.5 ** 0.5, 2.5 / 12.5 ** 0.5]
    torch.testing.assert_close(per_prompt, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    whole = ddpo_advantages(R)
    torch.testing.assert_close(whole, (R - 3.5) / 7 ** 0.5, rtol=1e-6, atol=0)


# ---- the value baseline: fits that never see the sample's own pair ------------------------------


def _least_squares_prediction(q, r, q_new, weights=None):
    """a q_new + c with (a, c) the weighted least-squares line of r on q (torch.linalg.lstsq)."""
    w = torch.ones_like(q) if weights is None else weights
    design = torch.stack([q, torch.ones_like(q)], 1) * w.sqrt()[:, None]
    a, c = torch.linalg.lstsq(design, (r * w.sqrt())[:, None]).solution.flatten()
    return a * q_new + c


def test_value_baseline_is_the_line_through_the_other_samples():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, generator=g, dtype=torch.float64)  # 3 steps, 6 samples
    r = torch.randn(6, generator=g, dtype=torch.float64)
    b, fallbacks = value_baseline(q, r)
    assert fallbacks == 0
    for s in range(3):
        for i in range(6):
            others = torch.arange(6) != i
            want = _least_squares_prediction(q[s, others], r[others], q[s, i])
            torch.testing.assert_close(b[s, i], want, rtol=1e-10, atol=1e-12)


def test_running_fit_pools_decayed_earlier_pairs_with_the_other_samples():
    g = torch.Generator().manual_seed(1)
    state, decay, ks = ValueStatistics(), 0.5, [1, 3]
    pairs = []  # (q at ks (2,), r, age) of every earlier sample
    for update in range(3):
        q = torch.randn(2, 4, generator=g, dtype=torch.float64) + 10.0  # a mean far from 0: centred sums stay exact
        r = 2.0 * q[1] + torch.randn(4, generator=g, dtype=torch.float64)
        if update == 2:
            b, _ = value_baseline(q, r, state.history(5, ks))
            for s in range(2):
                for i in range(4):
                    hq = torch.stack([p[0][s] for p in pairs])
                    hr = torch.stack([p[1] for p in pairs])
                    weights = torch.tensor([decay ** p[2] for p in pairs], dtype=torch.float64)
                    others = torch.arange(4) != i
                    want = _least_squares_prediction(torch.cat([hq, q[s, others]]), torch.cat([hr, r[others]]),
                                                     q[s, i], torch.cat([weights, torch.ones(3, dtype=torch.float64)]))
                    torch.testing.assert_close(b[s, i], want, rtol=1e-9, atol=1e-10)
        state.update(5, ks, q, r, decay)
        pairs = [(pq, pr, age + 1) for pq, pr, age in pairs] + [(q[:, i], r[i], 0) for i in range(4)]
    assert state.moments.count.tolist() == [0, 4 * (1 + 0.5 + 0.25), 0, 4 * (1 + 0.5 + 0.25), 0]


def test_value_baseline_falls_back_to_the_pool_mean():
    r = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    # three samples: two other pairs are too few for a slope
    b, fallbacks = value_baseline(torch.tensor([[0.0, 1.0, 5.0]], dtype=torch.float64), r)
    assert b[0].tolist() == pytest.approx([3.0, 2.5, 1.5], rel=1e-12) and fallbacks == 3
    # no spread of q among the others
    r4 = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    b, fallbacks = value_baseline(torch.full((1, 4), 0.3, dtype=torch.float64), r4)
    assert b[0].tolist() == pytest.approx([5.0, 14 / 3, 4.0, 7 / 3], rel=1e-12) and fallbacks == 4
    # four samples: three other pairs are still too few (MIN_PAIRS = 4)
    q4 = torch.tensor([[0.0, 1.0, 5.0, 2.0]], dtype=torch.float64)
    b, fallbacks = value_baseline(q4, r4)
    assert b[0].tolist() == pytest.approx([5.0, 14 / 3, 4.0, 7 / 3], rel=1e-12) and fallbacks == 4
    # a missing q (NaN) gets the mean of the others and stays out of their fits
    q = torch.tensor([[float("nan"), 0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    r6 = torch.tensor([100.0, 1.0, 3.0, 5.0, 7.0, 9.0], dtype=torch.float64)  # r = 2 q + 1 on the valid ones
    b, fallbacks = value_baseline(q, r6)
    assert fallbacks == 1  # sample 0; every other sample's pool still holds four valid pairs
    torch.testing.assert_close(b[0, 0], torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(b[0, 1:], r6[1:])


def test_value_statistics_round_trip_and_errors():
    g = torch.Generator().manual_seed(2)
    state = ValueStatistics()
    assert state.state_dict() == {} and state.history(4, [0, 1]) is None
    q = torch.randn(2, 5, generator=g, dtype=torch.float64)
    q[0, 3] = float("nan")  # a missing proxy reward stays out of the statistics
    state.update(4, [0, 2], q, torch.randn(5, generator=g, dtype=torch.float64), decay=0.9)
    assert state.moments.count.tolist() == [4, 0, 5, 0]
    copy = ValueStatistics()
    copy.load_state_dict(state.state_dict())
    for f in ("count", "mean_q", "mean_r", "ss_q", "ss_qr"):
        assert torch.equal(getattr(state.moments, f), getattr(copy.moments, f))
    with pytest.raises(ValueError, match="statistics of a 4-step chain, the trajectory has 6 steps"):
        state.history(6, [0])
    with pytest.raises(ValueError, match=r"value_state is missing \['ss_qr'\]"):
        ValueStatistics().load_state_dict({k: v for k, v in state.state_dict().items() if k != "ss_qr"})
    with pytest.raises(ValueError, match="must all be \\(num_steps,\\)"):
        ValueStatistics().load_state_dict(dict(state.state_dict(), count=torch.zeros(3)))
