"""Per-step conditioning (prompt schedules) in the rollout, every recomputation, the estimators and
the CUDA-graph step.

References are written with explicit conditioning: each step's (B, L, D) embeddings stacked in the
test from the prompt each (step, sample) should see, never through `prompt_index`.
"""

import math

import pytest
import torch

import rlr_fast
from rlr_fast.cuda_graph import TOLERANCE, GraphedRollout
from rlr_fast.ddim import ddim_step
from rlr_fast.lora import lora_parameters
from rlr_fast.prompts import PromptSteps, step_conditioning
from rlr_fast.rollout import predict, recompute_steps
from rlr_fast.testing import (TOY_SCHEDULE, ConditionedLinearEps, exact_loss_gradient, make_lora_unet, make_scheduler,
                              make_unet, quadratic_reward)

T = 6
PROMPTS = ["red circle", "green square", "blue triangle"]
# coarse for the first half, fine for the second; "green square" goes through three texts
SCHEDULE = {
    "red circle": [{"prompt": "shape", "from_step": 0.0, "to_step": 0.5},
                   {"prompt": "red circle", "from_step": 0.5, "to_step": 1.0}],
    "green square": [{"prompt": "shape", "from_step": 0.0, "to_step": 0.34},
                     {"prompt": "square", "from_step": 0.34, "to_step": 0.67},
                     {"prompt": "green square", "from_step": 0.67, "to_step": 1.0}],
}
# what each base prompt must see at steps k = 0..5 (written out, not computed by the schedule code)
EXPECTED = {
    "red circle": ["shape"] * 3 + ["red circle"] * 3,
    "green square": ["shape"] * 3 + ["square"] * 2 + ["green square"],
    "blue triangle": ["blue triangle"] * 6,
}
BATCH_IDS = torch.tensor([0, 1, 2, 1])  # B = 4 samples: their base prompts


def _embeddings(texts, dim=16, tokens=5, dtype=torch.float32):
    """A fixed random embedding per text, looked up by name."""
    return {t: torch.randn(tokens, dim, generator=torch.Generator().manual_seed(100 + i), dtype=dtype)
            for i, t in enumerate(sorted(set(texts)))}


def _scheduled_kwargs(dim=16, tokens=5, dtype=torch.float32):
    steps = PromptSteps(PROMPTS, SCHEDULE, num_steps=T)
    table = _embeddings(steps.texts, dim, tokens, dtype)
    embeddings = torch.stack([table[t] for t in steps.texts])
    return step_conditioning(embeddings, steps.step_ids, BATCH_IDS), table


def _explicit_cond(table, k):
    """(B, L, D): the embedding of the text each sample should see at step k."""
    return torch.stack([table[EXPECTED[PROMPTS[i]][k]] for i in BATCH_IDS.tolist()])


def test_expected_table_is_what_the_schedule_says():
    """k / 6 = 0, .17, .33 | .5, .667 | .83: green square's .667 is below its 0.67 boundary."""
    steps = PromptSteps(PROMPTS, SCHEDULE, num_steps=T)
    for i, base in enumerate(PROMPTS):
        assert [steps.texts[j] for j in steps.step_ids[i]] == EXPECTED[base], base


def _rollout(unet, guidance, split_cfg=False, seed=3, **kw):
    dtype = next(unet.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(len(BATCH_IDS), 4, 8, 8, generator=g, dtype=dtype)
    negative = torch.randn(1, 5, 16, generator=g, dtype=dtype)
    cfg = dict(negative_encoder_hidden_states=negative, guidance_scale=guidance) if guidance != 1.0 else {}
    scheduled, table = _scheduled_kwargs(dtype=dtype)
    traj = rlr_fast.rollout(unet, make_scheduler(), x_T, num_steps=T, eta=1.0, split_cfg=split_cfg,
                            generator=torch.Generator().manual_seed(seed), **scheduled, **cfg, **kw)
    return traj, table, x_T, cfg


CASES = [(1.0, False), (5.0, False), (5.0, True)]


@pytest.mark.parametrize("guidance, split_cfg", CASES)
@pytest.mark.slow
def test_scheduled_rollout_equals_single_prompt_steps_stitched(unet, guidance, split_cfg):
    traj, table, x_T, cfg = _rollout(unet, guidance, split_cfg)
    # stored compactly: the 5 distinct texts of this batch once, and a (T, B) index
    assert traj.encoder_hidden_states.shape == (5, 5, 16) and traj.prompt_index.shape == (T, 4)
    x = x_T
    for k in range(T):  # each step run on its own, conditioned on the step's prompts
        t = traj.timesteps[k]
        negative = cfg.get("negative_encoder_hidden_states")
        out, out_cond = predict(unet, x, t, _explicit_cond(table, k), None if negative is None else
                                negative.expand(len(x), -1, -1), guidance, split_cfg)
        per = [v[k].expand(len(x)) for v in (traj.c_x, traj.c_e, traj.sigmas)]
        x, _, _ = ddim_step(x, out, traj.noises[k], *per, model_output_cond=out_cond, guidance_scale=guidance)
        assert torch.equal(traj.latents[k + 1], x), k
    # the steps before the first switch are a plain single-prompt rollout; after it, they are not
    plain = rlr_fast.rollout(unet, make_scheduler(), x_T, num_steps=T, eta=1.0, split_cfg=split_cfg,
                             encoder_hidden_states=_explicit_cond(table, 0),
                             generator=torch.Generator().manual_seed(3), **cfg)
    assert torch.equal(plain.latents[:4], traj.latents[:4])
    assert not torch.equal(plain.latents[4, :2], traj.latents[4, :2])  # red circle switched at k = 3


def test_scheduled_rollout_equals_diffusers_step_by_step(unet):
    """The same chain from diffusers' DDIMScheduler.step with the step's prompt embeddings."""
    traj, table, x_T, cfg = _rollout(unet, 5.0)
    ref = make_scheduler()
    ref.set_timesteps(T)
    x = x_T
    negative = cfg["negative_encoder_hidden_states"].expand(len(x), -1, -1)
    for k, t in enumerate(ref.timesteps):
        e_u = unet(x, t, encoder_hidden_states=negative).sample
        e_c = unet(x, t, encoder_hidden_states=_explicit_cond(table, k)).sample
        x = ref.step(e_u + 5.0 * (e_c - e_u), t, x, eta=1.0, variance_noise=traj.noises[k]).prev_sample
    torch.testing.assert_close(traj.x0, x, rtol=1e-4, atol=1e-4 * x.abs().max().item())


@pytest.mark.parametrize("guidance, split_cfg", CASES)
@pytest.mark.slow
def test_recompute_under_schedule_equals_rollout_step(unet, guidance, split_cfg):
    traj, *_ = _rollout(unet, guidance)
    for k in range(T):
        mean = rlr_fast.recompute_step(unet, traj, k, split_cfg=split_cfg)
        torch.testing.assert_close(mean + traj.sigmas[k].float() * traj.noises[k], traj.latents[k + 1],
                                   rtol=1e-5, atol=1e-6)
    # several steps in one call (step-major stacking) give the same means and log-densities
    ks = [4, 1, 3, 0]
    means, logp = recompute_steps(unet, traj, ks, split_cfg=split_cfg, with_log_prob=True)
    for i, k in enumerate(ks):
        torch.testing.assert_close(means[i], rlr_fast.recompute_step(unet, traj, k), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logp[i], traj.log_probs[k], rtol=1e-5, atol=1e-3)


# ---- gradients through the UNet with guidance: sweeps and chunks against explicit references ----------
# in float64, so that the comparisons are tight and a recomputation that is merely close would show


@pytest.fixture(scope="module")
def lora_unet():
    return make_lora_unet(torch.float64)


def _reward(x0):
    return -x0.pow(2).flatten(1).mean(1)


def _grads(unet):
    return torch.cat([p.grad.flatten() for p in lora_parameters(unet)])


def _explicit_mean(unet, traj, table, k, x):
    """mu_k(x) = c_x x + c_e (e_u + w (e_c - e_u)), e_c from the step's explicit conditioning."""
    e_c = unet(x, traj.timesteps[k], encoder_hidden_states=_explicit_cond(table, k)).sample
    e = e_c
    if traj.uses_cfg:
        e_u = unet(x, traj.timesteps[k], encoder_hidden_states=traj.negative_encoder_hidden_states).sample
        e = e_u + traj.guidance_scale * (e_c - e_u)
    return traj.c_x[k] * x + traj.c_e[k] * e


def _estimate(unet, traj, method, **options):
    unet.zero_grad(set_to_none=True)
    rlr_fast.estimate(unet, traj, _reward, method=method, generator=torch.Generator().manual_seed(0), **options)
    return _grads(unet).clone()


@pytest.mark.parametrize("split_cfg", [False, True])
@pytest.mark.slow
def test_full_backprop_under_schedule_equals_one_explicit_graph(lora_unet, split_cfg):
    traj, table, *_ = _rollout(lora_unet, 5.0)
    ours = _estimate(lora_unet, traj, "full_bp", split_cfg=split_cfg)
    lora_unet.zero_grad(set_to_none=True)
    x = traj.latents[0]
    for k in range(T):
        x = _explicit_mean(lora_unet, traj, table, k, x) + traj.sigmas[k] * traj.noises[k]
    (-_reward(x).mean()).backward()
    torch.testing.assert_close(ours, _grads(lora_unet), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("split_cfg, max_batch", [(False, None), (False, 12), (True, 12)])
@pytest.mark.slow
def test_likelihood_ratio_chunks_under_schedule_equal_explicit_terms(lora_unet, split_cfg, max_batch):
    """zo, baseline none: sum_k sum_b -(R_b / B) <noise_k^b / sigma_k, mu_k^b>, chunks of 3 steps or 1."""
    traj, table, *_ = _rollout(lora_unet, 5.0)
    ours = _estimate(lora_unet, traj, "zo", split_cfg=split_cfg, max_batch=max_batch)
    lora_unet.zero_grad(set_to_none=True)
    adv = -_reward(traj.x0) / traj.batch_size
    for k in range(T):
        mean = _explicit_mean(lora_unet, traj, table, k, traj.latents[k])
        score = traj.noises[k] / traj.sigmas[k]
        ((adv[:, None] * (score * mean).flatten(1)).sum()).backward()
    torch.testing.assert_close(ours, _grads(lora_unet), rtol=1e-9, atol=1e-12)


def test_ddpo_under_schedule_is_on_policy_at_the_rollout(lora_unet):
    """At the rollout's own parameters every recomputed ratio is 1 (to float64 rounding): nothing clips
    even at clip_range 1e-6, which holds only if each step is recomputed with the conditioning it was
    sampled with."""
    traj, *_ = _rollout(lora_unet, 5.0)
    lora_unet.zero_grad(set_to_none=True)
    stats = rlr_fast.estimate(lora_unet, traj, _reward, method="ddpo", clip_range=1e-6,
                              advantages=torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64))
    assert stats["clip_fraction"] == 0.0
    assert _grads(lora_unet).abs().sum() > 0


# ---- unbiasedness on the conditioned linear-Gaussian toy ------------------------------------------------
# Power, by breaking the recomputation on purpose (n = 600, B = 12; unbroken max |z| 1.2-1.6): reading step
# 0's conditioning at every step gives max |z| = 91 (full_bp), 14 (rlr-h2), 24 (rlr chunks), 20 (zo); the
# next step's conditioning (an off-by-one) 43 for full_bp but only 1.8-3.3 for the likelihood-ratio
# estimators, whose noise hides it: the exact tests above catch that one.

Z_MAX = 4.0  # as tests/test_estimators.py: false alarm < 18 * 6.3e-5 per configuration (18 coordinates)
TARGET = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)


COPIES = 4  # B = 12: four samples of each plan per rollout, so each estimate averages more noise away


def _toy_conditioning(steps):
    """Per-step conditioning of the toy: three prompt vectors; sample 0 alternates between two at every
    step, sample 1 cycles through the three every two steps, sample 2 has a coarse and a fine half.
    Each plan is repeated COPIES times (B = 3 * COPIES)."""
    vectors = torch.tensor([[2.0, -1.0, 0.6], [-1.6, 1.2, 0.4], [0.2, 1.8, -2.0]], dtype=torch.float64)
    plan = [[k % 2 for k in range(steps)], [(k // 2) % 3 for k in range(steps)],
            [1 + 2 * k // steps for k in range(steps)]] * COPIES
    cond = torch.stack([vectors[p] for p in plan], 1)  # (T, B, dim), the closed form's input
    index = torch.tensor(plan).T  # (T, B)
    return vectors[:, None, :], index, cond


@pytest.mark.parametrize("method, opts", [
    ("full_bp", {}),
    ("rlr", dict(h=2, baseline="loo")),
    ("rlr", dict(first_order_steps=2, h=3, zo_steps=2, baseline="loo", max_batch=24)),
    ("zo", dict(baseline="loo", max_batch=36)),
], ids=["full_bp", "rlr-h2", "rlr-f2-h3-zo2-chunks", "zo-chunks"])
@pytest.mark.slow
def test_estimators_stay_unbiased_with_per_step_conditioning(method, opts, n=600, steps=8):
    sched = make_scheduler(**TOY_SCHEDULE)
    model = ConditionedLinearEps(sched.alphas_cumprod, 3)
    embeddings, index, cond = _toy_conditioning(steps)
    exact = exact_loss_gradient(model, sched, steps, 1.0, TARGET, cond)
    g = torch.Generator().manual_seed(0)
    est = torch.empty(n, exact.numel(), dtype=torch.float64)
    for i in range(n):
        x_T = torch.randn(3 * COPIES, 3, generator=g, dtype=torch.float64)
        traj = rlr_fast.rollout(model, sched, x_T, num_steps=steps, eta=1.0, encoder_hidden_states=embeddings,
                                prompt_index=index, generator=g)
        model.zero_grad(set_to_none=True)
        rlr_fast.estimate(model, traj, quadratic_reward(TARGET), method=method, generator=g, **opts)
        est[i] = torch.cat([p.grad.flatten() for p in model.parameters()])
    z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(n))
    assert float(z.abs().max()) < Z_MAX, z


# ---- the CUDA-graph step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance, split_cfg", CASES)
@pytest.mark.slow
def test_static_step_under_schedule_equals_eager_rollout_on_cpu(unet, guidance, split_cfg):
    traj, _, x_T, cfg = _rollout(unet, guidance, split_cfg)
    scheduled, _ = _scheduled_kwargs()
    static = GraphedRollout(unet, make_scheduler(), split_cfg=split_cfg, capture=False)
    for _ in range(2):  # the second call reuses the static buffers
        got = static(x_T, num_steps=T, eta=1.0, generator=torch.Generator().manual_seed(3), **scheduled, **cfg)
        assert torch.equal(got.latents, traj.latents) and torch.equal(got.log_probs, traj.log_probs)
        assert torch.equal(got.prompt_index, traj.prompt_index)
        assert torch.equal(got.encoder_hidden_states, traj.encoder_hidden_states)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_graph_rollout_under_schedule_equals_eager_on_gpu(guidance):
    unet = make_unet().to("cuda")
    scheduled, _ = _scheduled_kwargs()
    scheduled = {k: v.to("cuda") for k, v in scheduled.items()}
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(len(BATCH_IDS), 4, 8, 8, generator=g).cuda()
    cfg = dict(negative_encoder_hidden_states=torch.randn(1, 5, 16, generator=g).cuda(), guidance_scale=guidance) \
        if guidance != 1.0 else {}
    kw = dict(num_steps=T, eta=1.0, **scheduled, **cfg)
    eager = rlr_fast.rollout(unet, make_scheduler(), x_T, generator=torch.Generator("cuda").manual_seed(1), **kw)
    graphed = GraphedRollout(unet, make_scheduler())
    got = graphed(x_T, generator=torch.Generator("cuda").manual_seed(1), **kw)
    scale = eager.latents.abs().max()
    assert float((got.latents - eager.latents).abs().max() / scale) <= TOLERANCE[torch.float32]
    # the same graph serves plain conditioning (same static shapes): no recapture
    plain = dict(kw, encoder_hidden_states=scheduled["encoder_hidden_states"][scheduled["prompt_index"][0]],
                 prompt_index=None)
    graphed(x_T, generator=torch.Generator("cuda").manual_seed(1), **plain)
    assert graphed.captures == 1


# ---- bad per-step conditioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("change, error, match", [
    (dict(prompt_index=torch.zeros(T, 4)), TypeError, "prompt_index must be an integer tensor"),
    (dict(prompt_index=torch.zeros(T - 1, 4, dtype=torch.int64)), ValueError, r"shape \(num_steps, batch\) = \(6, 4\)"),
    (dict(prompt_index=torch.full((T, 4), 5)), ValueError, r"index the 5 embeddings.*\[5, 5\]"),
    (dict(encoder_hidden_states=None), ValueError, "prompt_index needs encoder_hidden_states"),
])
def test_bad_prompt_index_is_named(unet, change, error, match):
    scheduled, _ = _scheduled_kwargs()
    with pytest.raises(error, match=match):
        rlr_fast.rollout(unet, make_scheduler(), torch.zeros(4, 4, 8, 8), num_steps=T, eta=1.0,
                         **{**scheduled, **change})
