"""Baselines, scales and DDPO's advantages on small hand-checked batches (their unbiasedness inside
an estimate is tested in test_estimators.py)."""

import pytest
import torch

from rlr_fast.baselines import (PromptRewardHistory, ValueStatistics, ddpo_advantages, reward_baseline,
                                reward_scale, value_baseline)
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
    # as the training loop (and ddpo-pytorch's stat tracker): population std + 1e-6
    # prompt 0: rewards 1, 4 -> mean 2.5, std 1.5; prompt 1: 2, 7 -> mean 4.5, std 2.5
    expected = [-1.5 / (1.5 + 1e-6), -2.5 / (2.5 + 1e-6), 1.5 / (1.5 + 1e-6), 2.5 / (2.5 + 1e-6)]
    torch.testing.assert_close(per_prompt, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    whole = ddpo_advantages(R)
    torch.testing.assert_close(whole, (R - 3.5) / (5.25 ** 0.5 + 1e-6), rtol=1e-12, atol=0)
    # one ddpo_advantages: the standalone function and the loop's history agree on one epoch
    loop, _ = PromptRewardHistory(size=16, min_count=16).advantages(["p"] * 4, R)
    torch.testing.assert_close(whole, loop, rtol=0, atol=0)


def test_prompt_reward_history_by_hand():
    """DDPO's stat tracker: the epoch's statistics until a prompt holds min_count rewards, then the
    prompt's own FIFO buffer (this epoch's rewards included); population standard deviations."""
    empty = PromptRewardHistory(size=3, min_count=2)
    adv, first = empty.advantages(["a", "b", "b"], torch.tensor([1.0, 2.0, 6.0]))
    # "a" has 1 reward (< 2): the epoch's mean 3 and std sqrt(14/3); "b" has 2: its own, mean 4, std 2
    epoch_std = (14 / 3) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([-2 / (epoch_std + 1e-6), -2 / (2 + 1e-6), 2 / (2 + 1e-6)],
                                                 dtype=torch.float64), rtol=1e-12, atol=0)
    assert first.buffers == {"a": (1.0,), "b": (2.0, 6.0)} and empty.buffers == {}  # the old history is unchanged
    adv, second = first.advantages(["b", "b"], torch.tensor([10.0, 4.0]))
    assert second.buffers["b"] == (6.0, 10.0, 4.0)  # FIFO of 3: the oldest reward (2) dropped
    mean, std = 20 / 3, 56 ** 0.5 / 3  # deviations -2/3, 10/3, -8/3
    torch.testing.assert_close(adv, torch.tensor([(10 - mean) / (std + 1e-6), (4 - mean) / (std + 1e-6)],
                                                 dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="min_count <= buffer size, got min_count=4, size=3"):
        PromptRewardHistory(size=3, min_count=4)


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


def test_reward_surrogate_fits_a_quadratic_and_round_trips():
    """The surrogate's features (x, x^2, 1) make a quadratic reward of a vector exactly linear: fitted on
    earlier pairs it predicts new ones; before as many pairs as features it predicts nothing (NaN)."""
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)

    def reward(x):
        return -(x - target).pow(2).sum(-1)

    state = ValueStatistics()
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    state.surrogate.update(x, reward(x), 0.9)
    assert torch.isnan(state.surrogate.predict(x)).all()  # 4 pairs < 7 features
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    state.surrogate.update(x, reward(x), 0.9)
    new = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)  # (steps, batch, dim): as x0_hat[ks]
    torch.testing.assert_close(state.surrogate.predict(new), reward(new), rtol=1e-4, atol=1e-4)
    copy = state.copy()
    assert torch.equal(copy.surrogate.predict(new), state.surrogate.predict(new))
    assert ValueStatistics().state_dict() == {}
