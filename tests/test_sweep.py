"""The sweeps' promises: activation memory flat in T and h by default, split guidance that frees one
half before the other (same gradient, half the memory), and per-term gradient norms.

Memory is the peak of bytes saved for backward (`SavedTensorMemory`, parameters and the stored
trajectory excluded) on the small diffusers UNet2DConditionModel of rlr_fast.testing with LoRA.
"""

import pytest
import torch

import rlr_fast
from rlr_fast.estimators import run_terms
from rlr_fast.lora import lora_parameters
from rlr_fast.options import EstimatorOptions
from rlr_fast.sweep import CallCounter, GradTerms
from rlr_fast.terms import Terms
from rlr_fast.testing import make_lora_unet, make_scheduler, naive_backprop

METHODS = ("rlr", "zo", "full_bp", "truncated_bp", "ddpo")


def _reward(x0):
    return -x0.pow(2).flatten(1).mean(1)


def _traj(unet, steps, *, batch=2, guidance=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    cond, negative = (torch.randn(batch, 3, 16, generator=g, dtype=dtype) for _ in range(2))
    x_T = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    cfg = dict(negative_encoder_hidden_states=negative, guidance_scale=guidance) if guidance != 1.0 else {}
    return rlr_fast.rollout(unet, make_scheduler(), x_T, num_steps=steps, eta=1.0, encoder_hidden_states=cond,
                            generator=g, **cfg)


@pytest.fixture(scope="module")
def lora_unet():
    return make_lora_unet()


def _estimate(unet, traj, method, **options):
    unet.zero_grad(set_to_none=True)
    return rlr_fast.estimate(unet, traj, _reward, method=method, generator=torch.Generator().manual_seed(0),
                             **options)


def _peak(unet, traj, method, **options):
    return _estimate(unet, traj, method, track_memory=True, **options)["peak_saved_bytes"]


def _grads(unet):
    return torch.cat([p.grad.flatten() for p in lora_parameters(unet)])


# ---- one step resident, with default options -----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_default_memory_is_flat_in_T(lora_unet, method):
    peaks = {T: _peak(lora_unet, _traj(lora_unet, T), method) for T in (8, 32)}
    assert max(peaks.values()) <= 1.25 * min(peaks.values()), peaks


@pytest.mark.slow
def test_default_rlr_memory_is_flat_in_h(lora_unet):
    traj = _traj(lora_unet, 32)
    peaks = {h: _peak(lora_unet, traj, "rlr", h=h) for h in (2, 8)}
    assert max(peaks.values()) <= 1.25 * min(peaks.values()), peaks


def test_batching_steps_is_an_explicit_choice(lora_unet):
    """max_batch = n * B runs n likelihood-ratio steps per call: n times the activations."""
    traj = _traj(lora_unet, 8)
    one = _peak(lora_unet, traj, "zo")
    four = _estimate(lora_unet, traj, "zo", max_batch=4 * traj.batch_size, track_memory=True)
    assert four["unet_forward"] == 2
    assert 3.5 * one < four["peak_saved_bytes"] < 4.5 * one


@pytest.mark.slow
def test_full_bp_sweep_is_flat_and_naive_graph_grows(lora_unet):
    sweep, naive = {}, {}
    for steps in (5, 10, 20):
        traj = _traj(lora_unet, steps, batch=1)
        sweep[steps] = _peak(lora_unet, traj, "full_bp")
        lora_unet.zero_grad(set_to_none=True)
        naive[steps] = naive_backprop(lora_unet, traj, _reward, track_memory=True)["peak_saved_bytes"]
    assert max(sweep.values()) <= 1.10 * min(sweep.values()), sweep
    # linear growth: doubling T doubles the naive graph (within 10%), and it dwarfs the sweep
    for a, b in ((5, 10), (10, 20)):
        assert 1.8 <= naive[b] / naive[a] <= 2.2, naive
    assert naive[20] > 10 * sweep[20]


def test_checkpointing_lowers_the_step_peak(lora_unet):
    traj = _traj(lora_unet, 4)
    plain = _peak(lora_unet, traj, "full_bp")
    ckpt = _peak(lora_unet, traj, "full_bp", checkpoint_unet=True)
    assert ckpt < 0.7 * plain
    assert not lora_unet.is_gradient_checkpointing  # restored afterwards


# ---- split guidance: one half's graph at a time ----------------------------------------------------


@pytest.mark.parametrize("method, options", [
    ("rlr", dict(h=2)),  # F and H (pathwise sweeps, input gradients) and C (likelihood-ratio chunks)
    ("rlr", dict(first_order_steps=2, h=3, max_batch=4)),  # several steps per likelihood-ratio call
    ("ddpo", {}),
])
@pytest.mark.slow
def test_split_guidance_gives_the_same_gradient(method, options):
    unet = make_lora_unet(torch.float64)
    traj = _traj(unet, 6, guidance=7.5)
    together = _estimate(unet, traj, method, **options)
    grad_together = _grads(unet)
    split = _estimate(unet, traj, method, split_cfg=True, **options)
    torch.testing.assert_close(_grads(unet), grad_together, rtol=1e-10, atol=1e-13)
    assert split["j"] == together["j"] and split["C"] == together["C"]


@pytest.mark.slow
def test_split_guidance_holds_half_the_activations(lora_unet):
    traj = _traj(lora_unet, 4, guidance=7.5)
    for method in METHODS:
        together = _estimate(lora_unet, traj, method, track_memory=True)
        split = _estimate(lora_unet, traj, method, split_cfg=True, track_memory=True)
        assert split["peak_saved_bytes"] < 0.6 * together["peak_saved_bytes"], method
        # two model calls per step instead of one batch of 2B; DDPO first needs the mean without a graph
        assert split["unet_backward"] == 2 * together["unet_backward"], method
        extra = 2 * together["unet_forward"] if method == "ddpo" else 0
        assert split["unet_forward"] == 2 * together["unet_forward"] + extra, method


# ---- per-term gradient norms -----------------------------------------------------------------------


def test_grad_terms_measure_what_each_term_added():
    a, b, c = (torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (3, 4, 2))
    terms = GradTerms([a, b, c])
    with terms.term("first"):
        a.grad = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)  # b and c keep no gradient
    with terms.term("second"):
        a.grad = a.grad + torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
        b.grad = torch.tensor([0.0, 0.0, 4.0, 0.0], dtype=torch.float64)  # grad appears inside the term
    with terms.term("first"):  # a name used twice adds up
        c.grad = torch.tensor([6.0, 8.0], dtype=torch.float64)
    assert terms.norms == {"first": pytest.approx(3.0 + 10.0, rel=1e-15), "second": pytest.approx(5.0, rel=1e-15)}


def test_term_norms_of_an_estimate_match_each_term_run_alone(lora_unet):
    traj = _traj(lora_unet, 8)
    stats = _estimate(lora_unet, traj, "rlr", h=3, baseline="loo")
    norms = stats["term_norms"]
    assert norms["total"] == pytest.approx(float(_grads(lora_unet).double().norm()), rel=1e-6)
    r = _reward(traj.x0)
    adv = -(r - (r.sum() - r) / (r.numel() - 1)) / r.numel()  # leave-one-out baseline, no scale
    adv = adv.expand(traj.num_steps, -1)  # the same for every step
    j, h = stats["j"], len(stats["H"])
    alone = {"first_order": Terms(first_order=1), "half_order": Terms(half_order=(j, h)),
             "zeroth_order": Terms(zeroth_order=stats["C"])}
    for name, terms in alone.items():
        lora_unet.zero_grad(set_to_none=True)
        x0 = traj.x0.detach().requires_grad_()
        (dr,) = torch.autograd.grad(-_reward(x0).sum() / r.numel(), x0)
        run_terms(lora_unet, traj, terms, dr, adv, EstimatorOptions(), CallCounter(), GradTerms([]))
        assert norms[name] == pytest.approx(float(_grads(lora_unet).double().norm()), rel=1e-5), name
        assert norms[name] > 0
