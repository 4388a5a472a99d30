"""SQDF (docs/estimator.md §11): its gradient against the objective written out with diffusers' own
DDIM step, the KL in closed form, the discount and the step range, the reduction to a one-step
reparameterised reward gradient, memory flat in T, the replay buffer, and bad input.

Models: the small diffusers UNet of rlr_fast.testing with LoRA (random B, so the policy differs
from the base model), float64 where exact agreement is asserted.
"""

import math

import pytest
import safetensors.torch
import torch

import rlr_fast
from rlr_fast.config import Config, load_config
from rlr_fast.lora import add_lora, lora_parameters
from rlr_fast.options import EstimatorOptions
from rlr_fast.replay import ReplayBuffer
from rlr_fast.sqdf import StepStates, chain_kl, draw_steps, estimate_states, kl_to_base, sqdf_gradient
from rlr_fast.sweep import CallCounter
from rlr_fast.testing import make_scheduler, make_unet

GUIDANCE = 3.0


def _lora_unet(dtype=torch.float64, random_b=True):
    unet = make_unet().to(dtype)
    add_lora(unet, rank=2, alpha=2, seed=0)
    if random_b:
        g = torch.Generator().manual_seed(3)
        for p in lora_parameters(unet):  # peft zeroes lora_B: random weights make the policy differ from the base
            p.data = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return unet


def _traj(unet, steps, *, batch=3, guidance=GUIDANCE, seed=0, scheduler=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    cond, negative = (torch.randn(batch, 3, 16, generator=g, dtype=dtype) for _ in range(2))
    cfg = dict(negative_encoder_hidden_states=negative, guidance_scale=guidance) if guidance != 1.0 else {}
    return rlr_fast.rollout(unet, scheduler or make_scheduler(), torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype),
                            num_steps=steps, eta=1.0, encoder_hidden_states=cond, generator=g, **cfg)


def _reward(x0):
    """Nonlinear and per sample, so dQ/dx0 depends on x0."""
    flat = x0.flatten(1)
    return -(flat - 0.3).pow(2).mean(1) + flat[:, :7].sin().sum(1)


def _grads(unet):
    return torch.cat([p.grad.flatten() for p in lora_parameters(unet)])


def _sqdf(unet, states, noise, **options):
    """Our gradient at given states and noise (the estimator's draws bypassed)."""
    unet.zero_grad(set_to_none=True)
    score = lambda x0: _score(x0)  # noqa: E731
    out = sqdf_gradient(unet, states, noise, score, EstimatorOptions(method="sqdf", **options), CallCounter())
    return _grads(unet).clone(), out


def _score(x0):
    x0 = x0.detach().requires_grad_()
    with torch.enable_grad():
        r = _reward(x0)
        (g,) = torch.autograd.grad(r.sum(), x0)
    return r.detach(), g


# ---- the gradient is autograd of the objective, written with diffusers' DDIMScheduler.step ----------


def _guided(model, x, t, cond, negative, w):
    out = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, cond])).sample
    u, c = out.chunk(2)
    return u + w * (c - u)


def _written_loss(unet, base, traj, ks, noise, alpha, gamma, x0_is_the_step=False):
    """mean_b -(gamma^(T-1-k) R(x0_hat) - alpha ||mu - mu_ref||^2 / (2 sigma^2)), one graph, computed
    with diffusers' scheduler and the base UNet built afresh (no adapters involved); x0_hat is the
    base model's Tweedie estimate at the next step, or x' itself with `x0_is_the_step`."""
    sched, T, eta = make_scheduler(), traj.num_steps, traj.eta
    sched.set_timesteps(T)
    loss = 0
    for b, k in enumerate(ks):
        x, cond, negative = (v[b:b + 1] for v in (traj.latents[k], traj.encoder_hidden_states,
                                                  traj.negative_encoder_hidden_states))
        t = sched.timesteps[k]
        e_theta = _guided(unet, x, t, cond, negative, traj.guidance_scale)
        e_base = _guided(base, x, t, cond, negative, traj.guidance_scale)
        zero = torch.zeros_like(x)
        moved = sched.step(e_theta, t, x, eta=eta, variance_noise=noise[b:b + 1]).prev_sample
        mean = sched.step(e_theta, t, x, eta=eta, variance_noise=zero).prev_sample
        mean_ref = sched.step(e_base, t, x, eta=eta, variance_noise=zero).prev_sample
        a = sched.alphas_cumprod[t].double()
        prev = t - sched.config.num_train_timesteps // T
        a_prev = sched.alphas_cumprod[prev].double() if prev >= 0 else sched.final_alpha_cumprod.double()
        var = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        if k == T - 1 or x0_is_the_step:
            x0 = moved
        else:
            t_next = sched.timesteps[k + 1]
            x0 = sched.step(_guided(base, moved, t_next, cond, negative, traj.guidance_scale), t_next, moved,
                            eta=0.0).pred_original_sample
        kl = (mean - mean_ref).pow(2).sum() / (2 * var)
        loss = loss - (gamma ** (T - 1 - k) * _reward(x0)[0] - alpha * kl) / len(ks)
    return loss


@pytest.mark.parametrize("split_cfg", [False, True])
@pytest.mark.parametrize("alpha, gamma, ks", [
    (0.05, 0.8, [1, 3, 4]),  # inner steps and the last one (x0_hat = x' there)
    (0.0, 1.0, [2, 2, 2]),  # no KL, one fixed inner step: the plain reparameterised one-step reward gradient
])
@pytest.mark.slow
def test_gradient_is_autograd_of_the_written_objective(split_cfg, alpha, gamma, ks):
    unet, base = _lora_unet(), make_unet().to(torch.float64)
    traj = _traj(unet, 5)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours, out = _sqdf(unet, StepStates.of(traj, torch.tensor(ks)), noise, sqdf_alpha=alpha, sqdf_gamma=gamma,
                      split_cfg=split_cfg)
    unet.zero_grad(set_to_none=True)
    _written_loss(unet, base, traj, ks, noise, alpha=alpha, gamma=gamma).backward()
    exact = _grads(unet)
    assert float((ours - exact).norm() / exact.norm()) < 1e-6
    assert exact.norm() > 0 and all(v > 0 for v in out["kl"].tolist())


@pytest.mark.slow
def test_a_custom_x0_estimator_is_differentiated_through_its_input():
    """x0_estimator as a callable: one that is Tweedie written again gives the default's gradient (its
    VJP by autograd instead of the split step), and the identity x0_hat = x' the written objective's."""
    from rlr_fast.sqdf import state_tweedie

    unet, base = _lora_unet(), make_unet().to(torch.float64)
    traj = _traj(unet, 5)
    states = StepStates.of(traj, torch.tensor([0, 2, 4]))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    default, _ = _sqdf(unet, states, noise, sqdf_alpha=0.05, split_cfg=True)
    again, _ = _sqdf(unet, states, noise, sqdf_alpha=0.05, x0_estimator=lambda ref, s: state_tweedie(ref, s))
    torch.testing.assert_close(again, default, rtol=1e-10, atol=1e-14)
    identity, _ = _sqdf(unet, states, noise, sqdf_alpha=0.05, x0_estimator=lambda ref, s: s.x)
    unet.zero_grad(set_to_none=True)
    _written_loss(unet, base, traj, [0, 2, 4], noise, alpha=0.05, gamma=1.0, x0_is_the_step=True).backward()
    exact = _grads(unet)
    assert float((identity - exact).norm() / exact.norm()) < 1e-6
    assert float((identity - default).norm() / default.norm()) > 1e-3


def test_the_lora_is_back_on_and_trainable_afterwards():
    unet = _lora_unet()
    flags = [p.requires_grad for p in unet.parameters()]
    traj = _traj(unet, 3, batch=2)
    before = unet(traj.latents[0], traj.timesteps[0], encoder_hidden_states=traj.encoder_hidden_states).sample
    rlr_fast.estimate(unet, traj, _reward, method="sqdf", generator=torch.Generator().manual_seed(0))
    assert [p.requires_grad for p in unet.parameters()] == flags
    after = unet(traj.latents[0], traj.timesteps[0], encoder_hidden_states=traj.encoder_hidden_states).sample
    assert torch.equal(before, after)


# ---- KL ------------------------------------------------------------------------------------------


def test_kl_is_the_closed_form_and_matches_the_public_per_element_mean():
    unet, base = _lora_unet(), make_unet().to(torch.float64)
    traj = _traj(unet, 4)
    states = StepStates.of(traj, torch.tensor([0, 2, 3]))
    kl = kl_to_base(unet, states, EstimatorOptions(method="sqdf"))
    for b, k in enumerate([0, 2, 3]):
        x, cond, negative = (v[b:b + 1] for v in (traj.latents[k], traj.encoder_hidden_states,
                                                  traj.negative_encoder_hidden_states))
        t = traj.timesteps[k]
        with torch.no_grad():
            diff = traj.c_e[k] * (_guided(unet, x, t, cond, negative, GUIDANCE) -
                                  _guided(base, x, t, cond, negative, GUIDANCE))  # the c_x x terms cancel
        closed = float(diff.pow(2).sum() / (2 * traj.sigmas[k] ** 2))
        assert kl[b].item() == pytest.approx(closed, rel=1e-10)
        # the public code's penalty: per-element mean of (mu_ref - mu)^2 / sigma^2 = (2 / D) KL
        public = float(diff.pow(2).mean() / traj.sigmas[k] ** 2)
        assert 2 * kl[b].item() / diff.numel() == pytest.approx(public, rel=1e-10)


def test_kl_and_its_gradient_are_zero_with_the_lora_at_init():
    unet = _lora_unet(random_b=False)  # peft's init: lora_B = 0, the policy is the base model
    traj = _traj(unet, 4)
    states = StepStates.of(traj, torch.tensor([0, 1, 3]))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    without, out = _sqdf(unet, states, noise, sqdf_alpha=0.0)
    with_kl, out_kl = _sqdf(unet, states, noise, sqdf_alpha=100.0)
    assert out_kl["kl"].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(without, with_kl) and without.norm() > 0


@pytest.mark.slow
def test_chain_kl_is_the_number_of_steps_times_one_drawn_step():
    """Its mean over the uniform step equals the sum of the steps' KLs: every value it returns is
    S KL_k of a step k of its sample, and over draws every step appears."""
    unet = _lora_unet()
    traj = _traj(unet, 3, batch=2)
    options = EstimatorOptions(method="sqdf")
    per_step = torch.stack([3 * kl_to_base(unet, StepStates.of(traj, torch.full((2,), k)), options)
                            for k in range(3)])  # (k, b)
    seen = set()
    for seed in range(30):
        values = chain_kl(unet, traj, torch.Generator().manual_seed(seed), options)
        for b in range(2):
            k = int((per_step[:, b] - values[b]).abs().argmin())
            assert values[b].item() == pytest.approx(per_step[k, b].item(), rel=1e-12)
            seen.add((k, b))
    assert len(seen) == 6 and (per_step > 0).all()


def test_alpha_pulls_the_policy_towards_the_base():
    """The KL term alone (reward constant) has the gradient alpha (mu - mu_ref) / sigma^2 / B on mu:
    a small step along -grad lowers the KL."""
    unet = _lora_unet()
    traj = _traj(unet, 4)
    states = StepStates.of(traj, torch.tensor([0, 1, 2]))
    options = EstimatorOptions(method="sqdf", sqdf_alpha=1.0)
    unet.zero_grad(set_to_none=True)
    noise = torch.zeros(3, 4, 8, 8, dtype=torch.float64)
    flat = lambda x0: (torch.zeros(x0.shape[0], dtype=x0.dtype), torch.zeros_like(x0))  # noqa: E731
    before = sqdf_gradient(unet, states, noise, flat, options, CallCounter())["kl"].sum()
    with torch.no_grad():
        for p in lora_parameters(unet):
            p -= 1e-3 * p.grad / _grads(unet).norm()
    after = kl_to_base(unet, states, options).sum()
    assert after < before


# ---- the discount and the step range ------------------------------------------------------------


def test_gamma_weights_the_reward_term_by_the_steps_after_k():
    unet = _lora_unet()
    traj = _traj(unet, 6, batch=1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for k in (1, 4, 5):
        states = StepStates.of(traj, torch.tensor([k]))
        plain, _ = _sqdf(unet, states, noise, sqdf_gamma=1.0)
        discounted, out = _sqdf(unet, states, noise, sqdf_gamma=0.7)
        assert out["weight"].item() == pytest.approx(0.7 ** (5 - k), rel=1e-15)
        torch.testing.assert_close(discounted, 0.7 ** (5 - k) * plain, rtol=1e-10, atol=1e-14)


def test_the_step_range_is_drawn_uniformly():
    sigmas = make_scheduler().alphas_cumprod[:8].double()  # any positive sigmas: 8 steps
    g = torch.Generator().manual_seed(0)
    n = 3000
    ks = draw_steps(EstimatorOptions(method="sqdf", sqdf_steps=(2, 5)), sigmas, n, g)
    counts = torch.bincount(ks, minlength=8)
    assert counts[:2].sum() == 0 and counts[5:].sum() == 0
    # each of the 3 steps has probability 1/3: counts within 5 standard errors of n / 3
    assert ((counts[2:5] - n / 3).abs() < 5 * math.sqrt(n * (1 / 3) * (2 / 3))).all()
    everything = draw_steps(EstimatorOptions(method="sqdf"), sigmas, n, g)
    assert set(everything.tolist()) == set(range(8))


def test_estimate_uses_its_generator_for_steps_and_noise():
    unet = _lora_unet()
    traj = _traj(unet, 5)
    runs = []
    for seed in (4, 4, 5):
        unet.zero_grad(set_to_none=True)
        stats = rlr_fast.estimate(unet, traj, _reward, method="sqdf", sqdf_alpha=0.1,
                                  generator=torch.Generator().manual_seed(seed))
        runs.append((stats["k"], _grads(unet).clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


# ---- alpha = 0 and a fixed step: the one-step reparameterised reward gradient ------------------


def test_alpha0_at_the_last_step_is_the_one_step_reward_gradient():
    """With k = T - 1 for every sample, alpha = 0 and the fresh noise equal to the chain's own last
    noise, x' is the chain's x_0 and SQDF's gradient is back-propagation of R(x_0) through the last
    step alone: truncated_bp with K = 1 (which also takes each sample's mean reward)."""
    unet = _lora_unet()
    traj = _traj(unet, 5)
    last = traj.num_steps - 1
    states = StepStates.of(traj, torch.full((3,), last))
    ours, out = _sqdf(unet, states, traj.noises[last], sqdf_alpha=0.0, sqdf_gamma=0.5, sqdf_steps=(last, last + 1))
    torch.testing.assert_close(out["q"], _reward(traj.x0), rtol=1e-12, atol=1e-12)
    unet.zero_grad(set_to_none=True)
    rlr_fast.estimate(unet, traj, _reward, method="truncated_bp", truncated_bp_k=1)
    torch.testing.assert_close(ours, _grads(unet), rtol=1e-10, atol=1e-13)


# ---- memory: one step resident ---------------------------------------------------------------------


@pytest.mark.slow
def test_memory_is_flat_in_T():
    unet = _lora_unet(torch.float32)
    peaks = {}
    for steps in (8, 32):
        traj = _traj(unet, steps, batch=2)
        unet.zero_grad(set_to_none=True)
        stats = rlr_fast.estimate(unet, traj, _reward, method="sqdf", sqdf_alpha=0.1, track_memory=True,
                                  generator=torch.Generator().manual_seed(0), sqdf_steps=(0, 2))
        peaks[steps] = stats["peak_saved_bytes"]
    assert max(peaks.values()) <= 1.1 * min(peaks.values()), peaks
    # one policy step with grad (batch 2 x 2 guidance halves): the same peak as one full_bp step
    traj = _traj(unet, 1, batch=2)
    unet.zero_grad(set_to_none=True)
    one = rlr_fast.estimate(unet, traj, _reward, method="full_bp", track_memory=True)["peak_saved_bytes"]
    assert 0.9 * one <= peaks[8] <= 1.1 * one


# ---- the replay buffer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chains():
    """Three rollouts of 2 chains (T = 4) of the base model, float32."""
    unet = make_unet()
    return [_traj(unet, 4, batch=2, seed=s, guidance=1.0) for s in range(3)]


def _filled(chains, **kw):
    buffer = ReplayBuffer(capacity=kw.pop("capacity", 4), steps=kw.pop("steps", (1, 4)), headroom=2, **kw)
    for i, traj in enumerate(chains):
        buffer = buffer.added(traj, torch.tensor([0.5 + i, 1.0 + i]), torch.tensor([i, i + 10]), step=i)
    return buffer


def test_buffer_keeps_the_newest_chains_and_never_changes_an_old_buffer(chains):
    first = _filled(chains[:2])  # 4 chains: full
    snapshot = first.states(torch.arange(4), torch.tensor([1, 2, 3, 1]), torch.device("cpu")).x.clone()
    last = first.added(chains[2], torch.tensor([7.0, 8.0]), torch.tensor([5, 6]), step=9)
    assert len(first) == len(last) == 4
    assert torch.equal(first.states(torch.arange(4), torch.tensor([1, 2, 3, 1]), torch.device("cpu")).x, snapshot)
    assert last.chains("prompt_ids", torch.arange(4)).tolist() == [1, 11, 5, 6]  # the oldest two went
    assert last.chains("added_at", torch.arange(4)).tolist() == [1, 1, 9, 9]
    x = last.states(torch.tensor([2, 3]), torch.tensor([3, 1]), torch.device("cpu")).x
    assert torch.equal(x, torch.stack([chains[2].latents[3, 0], chains[2].latents[1, 1]]))


def test_buffer_sampling_is_seeded_and_survives_a_checkpoint(chains, tmp_path):
    for sampling in ("uniform", "reward"):
        buffer = _filled(chains, sampling=sampling, gamma=0.9)
        draws = [buffer.sample(3, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
        assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
        assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))
        # through a safetensors file and JSON, as a checkpoint stores it
        tensors, meta = buffer.to_checkpoint()
        safetensors.torch.save_file(tensors, str(tmp_path / "buffer.safetensors"))
        import json
        restored = ReplayBuffer.from_checkpoint(safetensors.torch.load_file(str(tmp_path / "buffer.safetensors")),
                                                json.loads(json.dumps(meta)))
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for _ in range(3):  # the same draws, states and next buffer, step after step
            a, b = buffer.sample(4, g1), restored.sample(4, g2)
            assert all(torch.equal(u, v) for u, v in zip(a, b))
            assert torch.equal(buffer.states(*a, torch.device("cpu")).x, restored.states(*b, torch.device("cpu")).x)
            buffer = buffer.added(chains[0], torch.tensor([3.0, 4.0]), torch.tensor([1, 2]), step=5)
            restored = restored.added(chains[0], torch.tensor([3.0, 4.0]), torch.tensor([1, 2]), step=5)


def test_uniform_sampling_draws_distinct_chains(chains):
    buffer = _filled(chains)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        picked, steps = buffer.sample(4, g)
        assert sorted(picked.tolist()) == [0, 1, 2, 3]
        assert all(1 <= k < 4 for k in steps.tolist())


def test_reward_sampling_follows_reward_and_discount(chains):
    """P(chain i, step k) = max(R_i, 0) gamma^(T-1-k) / Z; checked on 20000 draws to 5 standard errors."""
    buffer = ReplayBuffer(capacity=4, steps=(1, 4), headroom=2, sampling="reward", gamma=0.5)
    buffer = buffer.added(chains[0], torch.tensor([-1.0, 1.0]), torch.tensor([0, 1]), step=0)
    buffer = buffer.added(chains[1], torch.tensor([3.0, 0.0]), torch.tensor([2, 3]), step=0)
    n = 20000
    chain, step = buffer.sample(n, torch.Generator().manual_seed(0))
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0])[:, None] * torch.tensor([0.25, 0.5, 1.0])[None, :]
    p = (weights / weights.sum()).flatten()
    counts = torch.bincount(chain * 3 + (step - 1), minlength=12).double()
    se = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * se + 1e-9).all()


def test_buffer_errors(chains):
    with pytest.raises(ValueError, match="cannot draw 5 distinct chains from a replay buffer holding 4"):
        _filled(chains).sample(5)
    with pytest.raises(ValueError, match="every reward in the buffer is <= 0"):
        ReplayBuffer(4, (0, 4), 2, "reward").added(chains[0], torch.tensor([0.0, -1.0]), torch.tensor([0, 1]),
                                                   step=0).sample(1)
    with pytest.raises(ValueError, match="exceed the replay buffer's headroom"):
        ReplayBuffer(4, (0, 4), 1).added(chains[0], torch.tensor([1.0, 1.0]), torch.tensor([0, 1]), step=0)
    with pytest.raises(ValueError, match=r"empty|non-empty range"):
        ReplayBuffer(4, (2, 2), 1)
    with pytest.raises(ValueError, match="another schedule"):
        ReplayBuffer(4, (0, 3), 2).added(chains[0], torch.ones(2), torch.zeros(2), step=0).added(
            _traj(make_unet(), 3, batch=2, guidance=1.0), torch.ones(2), torch.zeros(2), step=1)


# ---- estimate_states: replayed states -------------------------------------------------------------


def test_replayed_states_give_the_gradient_of_the_same_states_from_the_chain():
    unet = _lora_unet()
    traj = _traj(unet, 4, batch=2)
    buffer = ReplayBuffer(capacity=4, steps=(0, 4), headroom=2).added(traj, torch.ones(2), torch.arange(2), 0)
    replayed = buffer.states(torch.tensor([1, 0]), torch.tensor([2, 3]), torch.device("cpu"),
                             traj.encoder_hidden_states.flip(0), traj.negative_encoder_hidden_states.flip(0))
    direct = StepStates.of(traj, torch.tensor([3, 2])).select(torch.tensor([1, 0]))
    grads = []
    for states in (replayed, direct):
        unet.zero_grad(set_to_none=True)
        estimate_states(unet, states, _reward, method="sqdf", sqdf_alpha=0.1, generator=torch.Generator().manual_seed(3))
        grads.append(_grads(unet).clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(sqdf_alpha=-0.1), "sqdf_alpha must be >= 0"),
    (dict(sqdf_gamma=0.0), r"sqdf_gamma must be in \(0, 1\]"),
    (dict(sqdf_gamma=1.5), r"sqdf_gamma must be in \(0, 1\]"),
    (dict(sqdf_steps=(3, 3)), r"sqdf_steps=\[3, 3\] is an empty range"),
    (dict(sqdf_steps=(0, 9)), "reaches past the chain"),
    (dict(x0_estimator="lcm"), "x0_estimator must be one of"),
])
@pytest.mark.slow
def test_bad_options(options, message):
    unet = _lora_unet(torch.float32)
    traj = _traj(unet, 4, batch=2)
    with pytest.raises(ValueError, match=message):
        rlr_fast.estimate(unet, traj, _reward, method="sqdf", **options)


def test_bad_config_values():
    with pytest.raises(ValueError, match="eta must be > 0"):
        Config(method="sqdf", eta=0.0).validate()
    with pytest.raises(ValueError, match=r"replay_capacity=6 is smaller than one update's 8 chains"):
        Config(method="sqdf", replay_capacity=6, batch_size=4, grad_accum=2).validate()
    with pytest.raises(ValueError, match="replay_sampling must be one of"):
        Config(method="sqdf", replay_capacity=8, replay_sampling="prioritized").validate()
    with pytest.raises(ValueError, match="replay_capacity is used by method='sqdf'"):
        Config(method="rlr", replay_capacity=8).validate()
    # as the CLI's --set parses them
    with pytest.raises(ValueError, match="sqdf_alpha must be >= 0"):
        load_config(sets=("method=sqdf", "sqdf_alpha=-1e-3"))
    with pytest.raises(ValueError, match=r"sqdf_steps=\[4, 2\] is an empty range"):
        load_config(sets=("method=sqdf", "sqdf_alpha=0.01", "sqdf_steps=[4, 2]"))  # on demo: alpha is asked for
    assert load_config(sets=("method=sqdf", "sqdf_alpha=0.01", "sqdf_gamma=0.5",
                             "sqdf_steps=0,5")).sqdf_steps == (0, 5)


def test_deterministic_steps_are_never_drawn():
    """A deterministic step (sigma = 0: here the last, with set_alpha_to_one) has no noise to
    reparameterise and no KL: the draws skip it, a range of nothing else is an error, and so is a
    replayed or given state at it."""
    sigmas = make_scheduler(set_alpha_to_one=True)
    unet = _lora_unet(torch.float32)
    traj = _traj(unet, 4, batch=2, scheduler=sigmas)
    assert float(traj.sigmas[3]) == 0 and (traj.sigmas[:3] > 0).all()
    ks = draw_steps(EstimatorOptions(method="sqdf"), traj.sigmas, 600, torch.Generator().manual_seed(0))
    assert set(ks.tolist()) == {0, 1, 2}
    buffer = ReplayBuffer(4, (0, 4), 2).added(traj, torch.ones(2), torch.arange(2), step=0)
    assert set(buffer.sample(2, torch.Generator().manual_seed(1))[1].tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match=r"sqdf_steps=\[3, 4\] holds no stochastic step"):
        rlr_fast.estimate(unet, traj, _reward, method="sqdf", sqdf_steps=(3, 4))
    with pytest.raises(ValueError, match=r"steps \[3\] are deterministic"):
        estimate_states(unet, StepStates.of(traj, torch.tensor([1, 3])), _reward, method="sqdf")


def test_the_base_model_must_be_had():
    unet = make_unet()
    for p in unet.conv_in.parameters():
        p.requires_grad_(True)  # trainable, but no LoRA to switch off
    traj = _traj(unet, 3, batch=2)
    with pytest.raises(ValueError, match="no LoRA adapters to switch off"):
        rlr_fast.estimate(unet, traj, _reward, method="sqdf")
    with pytest.raises(ValueError, match="reference must be frozen"):
        rlr_fast.estimate(unet, traj, _reward, method="sqdf", reference=unet)
    frozen = make_unet()
    rlr_fast.estimate(unet, traj, _reward, method="sqdf", reference=frozen)
    with pytest.raises(ValueError, match="reference is used by method='sqdf' and 'grpo' only"):
        rlr_fast.estimate(unet, traj, _reward, method="full_bp", reference=frozen)


# ---- finetune: method="sqdf", the replay buffer in checkpoints, kl and diversity in every record ----


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """A run of a few seconds on the tiny SD: T = 3, one prompt x 2 images per micro-batch."""
    return dict(model=str(tiny_folder), num_steps=3, batch_size=2, images_per_prompt=2, sample_prompts=1,
                sample_seeds=(0,), tensorboard=False, lr=1e-2, reward="brightness", method="sqdf",
                sqdf_alpha=0.01, sqdf_gamma=0.9)


def _records(out_dir):
    import json
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _lora(out_dir):
    return safetensors.torch.load_file(str(out_dir / "pytorch_lora_weights.safetensors"))


REPLAY = dict(replay_capacity=6, replay_ratio=2, grad_accum=2, replay_sampling="reward")


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    from rlr_fast.train import finetune
    return finetune(out_dir=str(tmp_path_factory.mktemp("sqdf")), train_steps=5, checkpoint_every=2, **tiny, **REPLAY)


@pytest.mark.slow
def test_replay_run_logs_its_buffer_kl_and_diversity(straight):
    rows = _records(straight.out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # fresh chains (and their rewards) every replay_ratio = 2 steps: batch_size x grad_accum = 4 each
    assert [r["estimator"]["replay_size"] for r in rows] == [4, 4, 6, 6, 6]
    assert [r["reward_mean"] is not None for r in rows] == [True, False, True, False, True]
    assert [r["reward_queries"] for r in rows] == [8, 4, 8, 4, 8]  # x_0 once per fresh chain, one Q per draw
    assert rows[0]["kl"] == 0.0  # LoRA B = 0: the first rollouts are the base model's
    assert rows[2]["kl"] > 0 and rows[1]["kl"] is None  # measured on each step's fresh chains
    assert all(r["diversity"] > 0 for r in rows[::2])
    assert rows[3]["estimator"]["replay_age_mean"] > 0


def test_the_replay_buffer_is_stored_once(straight):
    """Beside the newest checkpoint only, not in every checkpoint (3.1 GiB each at SD1.4 size)."""
    from rlr_fast.checkpoint import find_checkpoint, read_checkpoint

    folder = straight.out_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "state_000005.safetensors", "step_000002.safetensors", "step_000004.safetensors", "step_000005.safetensors"]
    for step in (2, 4, 5):
        tensors = read_checkpoint(folder / f"step_{step:06d}.safetensors").tensors
        assert not any(k.startswith("method/") for k in tensors)
    tensors, meta = find_checkpoint(straight.out_dir).method_state()
    assert tensors["latents"].shape[0] == meta["buffer"]["size"] == 6


@pytest.mark.slow
def test_replay_run_resumes_bit_exactly_after_a_kill(straight, tiny, tmp_path):
    """Killed at step 5, which added fresh chains; resumed from the step-3 checkpoint (a full buffer,
    between two refreshes): the same draws, LoRA and metrics as the run that was never stopped."""
    from rlr_fast.train import finetune

    def kill_at_5(step, record):
        if step == 5:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(out_dir=str(tmp_path), train_steps=5, checkpoint_every=3, callback=kill_at_5, **tiny, **REPLAY)
    result = finetune(resume=str(tmp_path))
    a, b = _lora(straight.out_dir), _lora(result.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def numbers(out_dir):
        return [[r[k] for k in ("reward_mean", "kl", "diversity", "grad_norm")] +
                [r["estimator"][k] for k in ("k", "replay_age_mean")] for r in _records(out_dir)]

    assert numbers(straight.out_dir) == numbers(tmp_path)


@pytest.mark.slow
def test_every_method_logs_kl_and_diversity(tiny, tmp_path):
    from rlr_fast.options import read_by
    from rlr_fast.train import finetune

    for method in ("rlr", "sqdf"):
        out = tmp_path / method
        finetune(out_dir=str(out), train_steps=2, **read_by(method, dict(tiny, method=method)))  # rlr: no sqdf_alpha
        rows = _records(out)
        assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # the base model, then one update away from it
        assert all(r["diversity"] > 0 and r["reward_mean"] is not None for r in rows)


def test_the_sqdf_preset_converts_the_public_alpha():
    """The public aesthetic script's alpha = 2.0 penalises the per-element mean of (mu_ref - mu)^2 /
    sigma^2, (2 / D) KL: ours is 2.0 x 2 / D with D the SD1.4 latent's element count."""
    from rlr_fast.models import sd14_config

    unet = sd14_config()["unet"]
    elements = unet["in_channels"] * unet["sample_size"] ** 2
    cfg = Config.from_preset("sqdf")
    assert cfg.sqdf_alpha == pytest.approx(2.0 * 2 / elements, rel=1e-15)
    assert (cfg.method, cfg.sqdf_gamma, cfg.sqdf_steps, cfg.num_steps, cfg.eta, cfg.guidance_scale) == \
           ("sqdf", 0.9, None, 50, 1.0, 5.0)
    assert (cfg.replay_capacity, cfg.replay_ratio, cfg.replay_sampling) == (1024, 1, "uniform")
    assert cfg.batch_size * cfg.grad_accum == 4 * 8 * 2  # their batch x accumulation x 2 GPUs per update


def test_the_diversity_is_that_of_the_first_images_a_reward_scores():
    """Every method scores a batch's x_0 first (sqdf before its soft Q), so that is what is measured."""
    from rlr_fast.metrics import diversity
    from rlr_fast.rewards import get_reward
    from rlr_fast.update import _ImageTap

    g = torch.Generator().manual_seed(0)
    first, later = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g) * 0.1
    ids = torch.tensor([0, 0, 1, 1])
    tap = _ImageTap(get_reward("brightness"), ids)
    tap(first, ["a"] * 4)
    tap(later, ["a"] * 4)
    assert tap.diversity == diversity(first, ids) != diversity(later, ids)
