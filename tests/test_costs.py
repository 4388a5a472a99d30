"""rlr_fast.costs against counted work: a toy model that counts the samples of every forward and
backward it runs, and a reward that counts every image it scores (and those it scores with grad)."""

import copy

import pytest
import torch

import rlr_fast
from rlr_fast.costs import CostModel, Work, step_sets, work
from rlr_fast.options import EstimatorOptions
from rlr_fast.testing import TOY_SCHEDULE, LinearEps, make_scheduler, quadratic_reward

TARGET = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
T, B = 6, 4


class Counts:
    def __init__(self):
        self.forward = self.backward = self.images = self.backward_images = 0


class CountingEps(LinearEps):
    """LinearEps that adds the samples of each call to `counts.forward`, and to `counts.backward` when a
    gradient flows back through the call's output."""

    counts: Counts

    def forward(self, sample, timestep, encoder_hidden_states=None):
        out = super().forward(sample, timestep)
        self.counts.forward += sample.shape[0]
        if out.requires_grad:
            out.register_hook(lambda g, n=sample.shape[0]: self._backward(n))
        return out

    def _backward(self, n):
        self.counts.backward += n


def counting_reward(counts: Counts):
    reward = quadratic_reward(TARGET)

    def score(x0):
        counts.images += x0.shape[0]
        r = reward(x0)
        if r.requires_grad:
            r.register_hook(lambda g, n=x0.shape[0]: setattr(counts, "backward_images", counts.backward_images + n))
        return r
    return score


def measured(opts: dict, sched_kw=None, **kwargs) -> tuple[Counts, int]:
    """The counted work of one estimate (rollout excluded) and the chain's number of sigma = 0 steps."""
    sched = make_scheduler(**{**TOY_SCHEDULE, **(sched_kw or {})})
    counts = Counts()
    model = CountingEps(sched.alphas_cumprod, 3)
    model.counts = Counts()  # the rollout's calls are not the estimate's
    g = torch.Generator().manual_seed(0)
    traj = rlr_fast.rollout(model, sched, torch.randn(B, 3, generator=g, dtype=torch.float64), num_steps=T, eta=1.0,
                            generator=g, store_x0_hat=True)
    model.counts = counts
    if opts.get("method") == "sqdf" or opts.get("grpo_beta"):
        kwargs["reference"] = copy.deepcopy(model).requires_grad_(False)
        kwargs["reference"].counts = counts  # the base model's calls are the estimate's work too
    if EstimatorOptions(**opts).needs_value_state:
        kwargs["value_state"] = rlr_fast.ValueStatistics()
    stats = rlr_fast.estimate(model, traj, counting_reward(counts), generator=g, **opts, **kwargs)
    deterministic = sum(float(s) == 0 for s in traj.sigmas)
    assert stats["reward_images"] == counts.images  # the estimator's own counters count what ran
    assert stats["reward_backward_images"] == counts.backward_images
    return counts, deterministic


STOCHASTIC = dict(steps_offset=1, set_alpha_to_one=False)  # TOY_SCHEDULE ends on timestep 0, a sigma = 0 step
CASES = [
    pytest.param(dict(method="rlr", h=2), {}, id="rlr-f1-h2"),
    pytest.param(dict(method="rlr", first_order_steps=0, h=3, baseline="loo"), STOCHASTIC, id="rlr-f0-h3"),
    pytest.param(dict(method="rlr", h=2, zo_steps=2, baseline="value"), {}, id="rlr-value-k2"),
    pytest.param(dict(method="rlr", first_order_steps=0, h=2, baseline="value", value_proxy="surrogate"), STOCHASTIC,
                 id="rlr-f0-value-surrogate"),
    pytest.param(dict(method="zo", baseline="value", value_fit="loo"), STOCHASTIC, id="zo-value"),
    pytest.param(dict(method="zo", baseline="loo"), {}, id="zo-sigma0-last"),
    pytest.param(dict(method="full_bp"), {}, id="full_bp"),
    pytest.param(dict(method="truncated_bp", truncated_bp_k=3), {}, id="truncated_bp-k3"),
    pytest.param(dict(method="ddpo"), STOCHASTIC, id="ddpo"),
    pytest.param(dict(method="ddpo"), {}, id="ddpo-sigma0-last"),
    pytest.param(dict(method="grpo"), STOCHASTIC, id="grpo"),
    pytest.param(dict(method="grpo", grpo_beta=0.1, grpo_step_fraction=0.5), {}, id="grpo-kl-half-sigma0-last"),
    pytest.param(dict(method="sqdf", sqdf_steps=(0, T - 1)), {}, id="sqdf-inner-steps"),
    pytest.param(dict(method="sqdf", sqdf_steps=(T - 1, T)), STOCHASTIC, id="sqdf-last-step"),
]


@pytest.mark.parametrize("opts,sched_kw", CASES)
def test_work_matches_counted_calls(opts, sched_kw):
    counts, deterministic = measured(opts, sched_kw)
    w = work(EstimatorOptions(**opts), T, deterministic=deterministic)
    assert (counts.forward, counts.backward) == (B * (w.recomputed + w.forwards), B * w.recomputed)
    assert (counts.images, counts.backward_images) == (B * w.reward_images, B * w.reward_backward_images)


def test_ddpo_given_advantages_scores_nothing():
    counts, deterministic = measured(dict(method="ddpo"), advantages=torch.ones(B))
    w = work(EstimatorOptions(method="ddpo"), T, deterministic=deterministic, scored=False)
    assert counts.images == w.reward_images == 0 and counts.backward == B * w.likelihood_ratio


def test_value_baseline_pays_one_image_per_likelihood_ratio_step():
    """Issue 20: at T = 10 the value baseline scores 1 + (likelihood-ratio steps) images per sample."""
    rlr = EstimatorOptions(method="rlr", first_order_steps=0, h=2, baseline="value")
    assert step_sets(rlr, 10) == (0, 2, 8)
    assert work(rlr, 10).reward_images == 1 + 8 + 1  # R(x0), C's 8 and the closing step of H
    assert work(EstimatorOptions.build(rlr, value_proxy="surrogate"), 10).reward_images == 1
    assert work(EstimatorOptions(method="zo", baseline="value"), 10).reward_images == 11


def test_prices():
    w = Work(rollout=10, pathwise=3, likelihood_ratio=7, forwards=0, reward_images=9, reward_backward_images=1)
    prices = CostModel(step=2.0, checkpoint=1.0, reward=0.5, reward_backward=2.0)
    assert prices.unet(w) == 10 + 2.0 * 10
    assert prices.unet(w, checkpoint_unet=True) == 10 + 3.0 * 10
    assert prices.rewards(w) == 0.5 * (9 + 2.0 * 1)
    with pytest.raises(ValueError, match="CostModel.step must be a finite number >= 0, got -1"):
        CostModel(step=-1)


def test_design_prices_candidates_with_the_cost_model():
    """Each design candidate costs what `work` of its options, priced, says (one cost model for all)."""
    sched = make_scheduler(**TOY_SCHEDULE)
    model = LinearEps(sched.alphas_cumprod, 3)
    g = torch.Generator().manual_seed(1)

    def pilot():
        return rlr_fast.rollout(model, sched, torch.randn(8, 3, generator=g, dtype=torch.float64), num_steps=T,
                                eta=1.0, generator=g)

    d = rlr_fast.design(model, pilot, quadratic_reward(TARGET), pilots=3, baselines=("loo",), max_h=2)
    prices = CostModel()
    for c in d.candidates:
        method, f, h, _, k, baseline = c.key
        opts = EstimatorOptions(method=method, **({} if method == "full_bp" else dict(baseline=baseline, zo_steps=k)),
                                **(dict(first_order_steps=f, h=h) if method == "rlr" else {}))
        w = work(opts, T, deterministic=f if method == "zo" else 0)
        assert (c.unet_cost, c.reward_cost) == pytest.approx((prices.unet(w), prices.rewards(w)))
        assert c.unet_cost == pytest.approx(T + 2.15 * (T if method == "full_bp" else f + h + (k or T - f - h)))
