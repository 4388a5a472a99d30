"""Baselines, scales and DDPO's advantages on small hand-checked batches (their unbiasedness inside
an estimate is tested in test_estimators.py)."""

import pytest
import torch

from rlr_fast.baselines import PromptRewardHistory, ddpo_advantages, reward_baseline, reward_scale
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
