"""Baselines, scales and DDPO's advantages on small hand-checked batches (their unbiasedness inside
an estimate is tested in test_estimators.py)."""

import pytest
import torch

from rlr_fast.baselines import ddpo_advantages, reward_baseline, reward_scale
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
