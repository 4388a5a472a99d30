"""GRPO (rlr_fast.grpo, docs/estimator.md §8.5): group advantages against a hand computation, the objective's
gradient against autograd of the objective written out with torch.distributions on the linear toy
(on-policy it is the plain policy gradient; the KL term is the closed-form Gaussian KL's), the trained
steps, the edge cases, and a short finetune on the demo preset that resumes bit-exactly mid-epoch."""

import copy
import json
import math

import pytest
import safetensors.torch
import torch

import rlr_fast
from rlr_fast.checkpoint import find_checkpoint
from rlr_fast.config import Config
from rlr_fast.grpo import group_advantages, trained_steps
from rlr_fast.options import EstimatorOptions
from rlr_fast.testing import LinearEps, make_lora_unet, make_scheduler, make_unet
from rlr_fast.train import finetune

D = 3  # the toy's latent elements per sample


def _grad_vector(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _zero_grad(model):
    for p in model.parameters():
        p.grad = None


def _toy(batch=4, steps=4, seed=6):
    sched = make_scheduler()
    model = LinearEps(sched.alphas_cumprod, D)
    traj = rlr_fast.rollout(model, sched, torch.randn(batch, D, dtype=torch.float64), num_steps=steps, eta=1.0,
                            generator=torch.Generator().manual_seed(seed))
    return model, traj


def _moved(model, scale=0.05, seed=0):
    """A frozen copy of `model` (the reference), and `model` moved off it (so ratios leave 1 and the KL is not 0)."""
    reference = copy.deepcopy(model).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return reference


def _written_loss(model, reference, traj, adv, ks, eps, beta):
    """The GRPO loss of the docstring of rlr_fast.grpo, from Normal log-densities and the Gaussian KL."""
    loss = 0
    for k in ks:
        mean = rlr_fast.recompute_step(model, traj, k)
        sigma = traj.sigmas[k]
        log_ratio = (torch.distributions.Normal(mean, sigma).log_prob(traj.latents[k + 1]).sum(1)
                     - traj.log_probs[k]) / D
        ratio = log_ratio.exp()
        loss = loss + torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).sum()
        if beta:
            with torch.no_grad():
                mean_ref = rlr_fast.recompute_step(reference, traj, k)
            kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, sigma),
                                                   torch.distributions.Normal(mean_ref, sigma)).sum(1) / D
            loss = loss + beta * kl.sum()
    return loss / (len(ks) * traj.batch_size)


# ---- advantages ------------------------------------------------------------------------------------


def test_group_advantages_against_a_hand_computation():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 1.0, 0.0, 1.0, 5.0, 7.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 4])
    # group 0: mean 2, population std 1; group 1: no spread; group 2: mean 3, std 2;
    # group 3: mean 2, std sqrt(14 / 3); group 4: one sample
    s3 = math.sqrt(14 / 3)
    expected = torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0, 2 / 2.0001, -2 / 2.0001,
                             -2 / (s3 + 1e-4), -1 / (s3 + 1e-4), 3 / (s3 + 1e-4), 0.0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, ids), expected, rtol=1e-12, atol=1e-12)
    whole = group_advantages(torch.tensor([0.0, 2.0]))  # no prompt ids: the batch is one group
    torch.testing.assert_close(whole, torch.tensor([-1 / 1.0001, 1 / 1.0001], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"prompt_ids must have shape \(3,\)"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.int64))


def test_estimate_standardises_within_each_prompt_when_not_given_advantages():
    model, traj = _toy()
    ids = torch.tensor([0, 0, 1, 1])
    reward = (lambda x0: x0.sum(1))
    stats = rlr_fast.estimate(model, traj, reward, method="grpo", prompt_ids=ids)
    ours = _grad_vector(model).clone()
    _zero_grad(model)
    rlr_fast.estimate(model, traj, None, method="grpo", advantages=group_advantages(traj.x0.sum(1), ids),
                      on_policy=True)  # as the scored samples are
    assert stats["reward_queries"] == 4 and torch.equal(ours, _grad_vector(model))


# ---- the objective's gradient ----------------------------------------------------------------------


def test_on_policy_the_ratio_is_1_and_the_gradient_is_the_plain_policy_gradient():
    """At the sampling policy r = 1 (nothing clipped) and the gradient is -1 / (B T D) sum_{b,k} A_b
    grad log p_theta: the zo estimator's with reward := A, divided by T D; and autograd of the written loss."""
    model, traj = _toy()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=torch.float64)
    stats = rlr_fast.estimate(model, traj, None, method="grpo", advantages=adv, clip_range=1e-4)
    assert stats["clip_fraction"] == 0 and stats["ratio_max_deviation"] < 1e-12 and stats["approx_kl"] < 1e-24
    assert stats["trained_steps"] == [0, 1, 2, 3] and stats["kl_to_reference"] is None
    grpo = _grad_vector(model).clone()
    _zero_grad(model)
    # told that the model sampled the chain, the ratio's denominator is the recomputed mean: r = 1 exactly
    exact = rlr_fast.estimate(model, traj, None, method="grpo", advantages=adv, on_policy=True)
    assert exact["ratio_max_deviation"] == 0 and exact["approx_kl"] == 0
    torch.testing.assert_close(grpo, _grad_vector(model), rtol=1e-9, atol=1e-12)
    _zero_grad(model)
    rlr_fast.estimate(model, traj, lambda x0: adv, method="zo")
    torch.testing.assert_close(grpo, _grad_vector(model) / (4 * D), rtol=1e-9, atol=1e-12)
    _zero_grad(model)
    _written_loss(model, None, traj, adv, range(4), 1e-4, 0).backward()
    torch.testing.assert_close(grpo, _grad_vector(model), rtol=1e-9, atol=1e-12)


def test_off_policy_clip_and_kl_match_the_written_objective():
    model, traj = _toy(batch=6, steps=5)
    reference = _moved(model)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0], dtype=torch.float64)
    stats = rlr_fast.estimate(model, traj, None, method="grpo", advantages=adv, clip_range=0.02, grpo_beta=0.3,
                              reference=reference)
    assert 0 < stats["clip_fraction"] < 1 and stats["kl_to_reference"] > 0
    ours = _grad_vector(model).clone()
    _zero_grad(model)
    _written_loss(model, reference, traj, adv, range(5), 0.02, 0.3).backward()
    torch.testing.assert_close(ours, _grad_vector(model), rtol=1e-7, atol=1e-10)


def test_the_kl_term_is_the_gradient_of_the_closed_form_kl():
    """With zero advantages only beta KL is left: its gradient is autograd of |mu - mu_ref|^2 / (2 sigma^2 D)."""
    model, traj = _toy(steps=5)
    reference = _moved(model, seed=3)
    stats = rlr_fast.estimate(model, traj, None, method="grpo", advantages=torch.zeros(4, dtype=torch.float64),
                              grpo_beta=2.0, reference=reference)
    ours = _grad_vector(model).clone()
    _zero_grad(model)
    kl = 0
    for k in range(5):
        with torch.no_grad():
            mean_ref = rlr_fast.recompute_step(reference, traj, k)
        kl = kl + ((rlr_fast.recompute_step(model, traj, k) - mean_ref) ** 2).sum() / (2 * traj.sigmas[k] ** 2 * D)
    (2.0 * kl / (5 * 4)).backward()
    torch.testing.assert_close(ours, _grad_vector(model), rtol=1e-9, atol=1e-12)
    assert stats["kl_to_reference"] == pytest.approx(float(kl.detach()) / 20, rel=1e-9)
    # the reference's means cost one forward per trained step, without a backward
    assert stats["unet_forward"] == 2 * 5 and stats["unet_backward"] == 5


# ---- the trained steps ("denoising reduction") ------------------------------------------------------


def test_a_step_fraction_trains_that_many_steps_drawn_uniformly():
    model, traj = _toy(steps=10)
    options = EstimatorOptions(method="grpo", grpo_step_fraction=0.3)
    g = torch.Generator().manual_seed(0)
    draws = [trained_steps(traj, options, g) for _ in range(2000)]
    assert all(len(d) == 3 and d == sorted(set(d)) for d in draws)
    # each step is in a draw with probability 3/10: 600 of 2000, binomial std sqrt(2000 * 0.3 * 0.7) = 20.5
    counts = torch.bincount(torch.tensor([k for d in draws for k in d]), minlength=10)
    assert ((counts - 600).abs() < 5 * 20.5).all(), counts
    assert trained_steps(traj, EstimatorOptions(method="grpo", grpo_step_fraction=0.01), g) in [[k] for k in range(10)]
    # the gradient is the written loss's over the drawn steps only
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    reference = _moved(model)
    stats = rlr_fast.estimate(model, traj, None, method="grpo", advantages=adv, grpo_step_fraction=0.3,
                              clip_range=0.05, generator=torch.Generator().manual_seed(1))
    assert len(stats["trained_steps"]) == 3 and stats["unet_steps"] == 3
    ours = _grad_vector(model).clone()
    _zero_grad(model)
    _written_loss(model, reference, traj, adv, stats["trained_steps"], 0.05, 0).backward()
    torch.testing.assert_close(ours, _grad_vector(model), rtol=1e-7, atol=1e-10)


# ---- edge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(images_per_prompt=1), "method='grpo' .* needs images_per_prompt >= 2 .*got 1"),
    (dict(grpo_beta=-0.1), "grpo_beta must be >= 0"),
    (dict(grpo_step_fraction=0.0), r"grpo_step_fraction must be in \(0, 1\], got 0.0"),
    (dict(grpo_step_fraction=1.5), r"grpo_step_fraction must be in \(0, 1\], got 1.5"),
    (dict(eta=0.0), "method='grpo' uses likelihood ratios, which need noise"),
    (dict(ddpo_minibatches=3), "ddpo_minibatches=3 must divide the 8 samples of an epoch"),
])
def test_bad_grpo_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        Config(method="grpo", batch_size=8, images_per_prompt=2).with_overrides(change)


def test_beta_0_runs_no_reference_and_needs_no_adapter():
    unet = make_unet()
    for p in unet.conv_in.parameters():
        p.requires_grad_(True)  # trainable, but no LoRA to switch off
    sched = make_scheduler()
    traj = rlr_fast.rollout(unet, sched, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                            num_steps=3, eta=1.0, encoder_hidden_states=torch.randn(2, 4, 16),
                            generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    stats = rlr_fast.estimate(unet, traj, None, method="grpo", advantages=adv)
    assert stats["unet_forward"] == stats["unet_backward"] == 3 and stats["kl_to_reference"] is None
    with pytest.raises(ValueError, match="method='grpo' compares the policy with the base model"):
        rlr_fast.estimate(unet, traj, None, method="grpo", advantages=adv, grpo_beta=0.1)


def test_the_adapter_off_unet_is_the_reference():
    """grpo_beta > 0 without a reference: the LoRA switched off. A fresh LoRA (B = 0) is the base model, so
    its KL is exactly 0; once moved, the KL gradient equals the one against an explicit base-model copy."""
    unet = make_lora_unet(torch.float64)
    with torch.no_grad():  # lora_B = 0: the LoRA as add_lora makes it, adding nothing
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.zero_()
    base = copy.deepcopy(unet).requires_grad_(False)
    sched = make_scheduler()
    traj = rlr_fast.rollout(unet, sched, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.float64),
                            num_steps=3, eta=1.0, encoder_hidden_states=torch.randn(2, 4, 16, dtype=torch.float64),
                            generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert rlr_fast.estimate(unet, traj, None, method="grpo", advantages=adv, grpo_beta=1.0)["kl_to_reference"] == 0
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    grads = []
    for reference in (None, base):
        unet.zero_grad(set_to_none=True)
        rlr_fast.estimate(unet, traj, None, method="grpo", advantages=adv, grpo_beta=1.0, reference=reference)
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-14)


# ---- finetune on the demo preset ---------------------------------------------------------------------


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_demo():
    """The demo preset with method=grpo (its per-prompt baseline is rlr's, off): epochs of 8 samples (4 prompts
    x 2), 2 passes of 2 minibatches of 4, so 4 optimizer steps an epoch; half the 10 steps trained per
    minibatch, a KL to the base model."""
    return dict(method="grpo", baseline="none", grpo_beta=0.01, grpo_step_fraction=0.5, ddpo_inner_epochs=2,
                ddpo_minibatches=2, train_steps=6, checkpoint_every=3, sample_every=0, sample_prompts=0, tensorboard=False,
                eval_every=0)


@pytest.fixture(scope="module")
def straight(grpo_demo, tmp_path_factory):
    return finetune(Config.from_preset("demo", out_dir=str(tmp_path_factory.mktemp("grpo")), **grpo_demo))


def test_a_demo_run_trains_with_finite_steps(straight):
    rows = records(straight.out_dir)
    assert [r["step"] for r in rows] == list(range(1, 7)) and not any(r["skipped"] for r in rows)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    for r in rows:
        est, first = r["estimator"], r["step"] in (1, 5)
        assert r["reward_queries"] == (8 if first else 0)  # each image scored once, when its epoch is drawn
        assert len(est["trained_steps"]) == 5 and est["unet_steps"] == 5
        # the minibatch's 4 samples at 5 steps: the policy's forward and backward, the reference's forward
        assert r["unet_forward_samples"] == (10 * 8 if first else 0) + 2 * 5 * 4
        assert r["unet_backward_samples"] == 5 * 4
        assert math.isfinite(est["kl_to_reference"])
    assert rows[0]["estimator"]["kl_to_reference"] == 0  # the fresh LoRA is the base model
    for first in (rows[0], rows[4]):  # on-policy: the ratio is 1 exactly, nothing clipped
        assert first["estimator"]["clip_fraction"] == 0 and first["estimator"]["ratio_max_deviation"] == 0
    # the epoch's advantages are standardised within each prompt's pair: +-h / (h + 1e-4), h half the pair's spread
    tensors, _ = find_checkpoint(straight.out_dir).method_state()
    pairs = tensors["advantages"].reshape(-1, 2)
    assert torch.allclose(pairs.sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert ((pairs.abs() > 0.5) & (pairs.abs() < 1)).all()


def test_resume_from_a_checkpoint_mid_epoch_is_bit_exact(straight, grpo_demo, tmp_path):
    def kill_at_4(step, record):
        if step == 4:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(Config.from_preset("demo", out_dir=str(tmp_path), **grpo_demo), callback=kill_at_4)
    checkpoint = find_checkpoint(tmp_path)
    assert checkpoint.step == 3 and len(checkpoint.method_state()[1]["queue"]) == 1  # one minibatch of the epoch left
    result = finetune(resume=str(tmp_path))
    a, b = records(straight.out_dir), records(result.out_dir)
    for key in ("reward_mean", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b]
    assert [r["estimator"] for r in a] == [r["estimator"] for r in b]
    lora_a, lora_b = (safetensors.torch.load_file(str(r.lora_path)) for r in (straight, result))
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
