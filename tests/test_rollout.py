"""rollout / recompute_step against diffusers' own DDIMScheduler.step, and the rollout's errors."""

import pytest
import torch

import rlr_fast
from rlr_fast.rollout import recompute_steps
from rlr_fast.testing import make_scheduler, make_unet


def _cond(batch, seed=1, dim=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, dim, generator=g)


def _run(unet, sched, eta, cfg, steps=6, batch=2, seed=0, **rollout_kw):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, 8, 8, generator=g)
    kw = dict(encoder_hidden_states=_cond(batch))
    if cfg:
        kw.update(negative_encoder_hidden_states=_cond(batch, seed=2), guidance_scale=5.0)
    traj = rlr_fast.rollout(unet, sched, x_t, num_steps=steps, eta=eta,
                            generator=torch.Generator().manual_seed(3), **kw, **rollout_kw)
    return traj, kw


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.slow
def test_each_step_equals_diffusers(unet, spacing, cfg, eta):
    sched = make_scheduler(timestep_spacing=spacing)
    traj, kw = _run(unet, sched, eta, cfg)
    ref = make_scheduler(timestep_spacing=spacing)
    ref.set_timesteps(traj.num_steps)
    assert torch.equal(ref.timesteps, traj.timesteps)
    x = traj.latents[0]
    for k, t in enumerate(ref.timesteps):
        x_k = traj.latents[k]
        if cfg:
            e_u = unet(x_k, t, encoder_hidden_states=kw["negative_encoder_hidden_states"]).sample
            e_c = unet(x_k, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample
            eps = e_u + 5.0 * (e_c - e_u)
        else:
            eps = unet(x_k, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample
        want = ref.step(eps, t, x_k, eta=eta, variance_noise=traj.noises[k]).prev_sample
        torch.testing.assert_close(traj.latents[k + 1], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        # the whole chain, run by diffusers from x_T, stays on ours too
        eps_x = unet(x, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample
        if cfg:
            e_u = unet(x, t, encoder_hidden_states=kw["negative_encoder_hidden_states"]).sample
            eps_x = e_u + 5.0 * (eps_x - e_u)
        x = ref.step(eps_x, t, x, eta=eta, variance_noise=traj.noises[k]).prev_sample
    torch.testing.assert_close(traj.x0, x, rtol=1e-4, atol=1e-4 * x.abs().max().item())


def test_trajectory_contents(unet, scheduler):
    traj, _ = _run(unet, scheduler, 1.0, cfg=False, steps=5, batch=3)
    assert traj.latents.shape == (6, 3, 4, 8, 8)
    assert traj.noises.shape == (5, 3, 4, 8, 8)
    assert traj.timesteps.shape == traj.sigmas.shape == (5,)
    assert traj.log_probs.shape == (5, 3)
    assert (traj.sigmas > 0).all()
    # log_probs are the Gaussian density of each stored draw under its mean
    for k in range(5):
        mean = rlr_fast.recompute_step(unet, traj, k).detach()
        dist = torch.distributions.Normal(mean, traj.sigmas[k].float())
        want = dist.log_prob(traj.latents[k + 1]).flatten(1).sum(1)
        torch.testing.assert_close(traj.log_probs[k], want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("cfg", [False, True])
def test_recompute_step_is_exact_and_differentiable(unet, scheduler, cfg):
    traj, _ = _run(unet, scheduler, 0.7, cfg=cfg)
    for k in range(traj.num_steps):
        mean = rlr_fast.recompute_step(unet, traj, k)
        prev = mean + traj.sigmas[k].float() * traj.noises[k]
        torch.testing.assert_close(prev, traj.latents[k + 1], rtol=1e-5, atol=1e-6)
    x = traj.latents[2].clone().requires_grad_()
    mean = rlr_fast.recompute_step(unet, traj, 2, sample=x)
    mean.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_batched_recompute_equals_one_step_at_a_time(unet, scheduler):
    traj, _ = _run(unet, scheduler, 1.0, cfg=True, steps=5)
    means = recompute_steps(unet, traj, [4, 1, 3])
    for i, k in enumerate([4, 1, 3]):
        torch.testing.assert_close(means[i], rlr_fast.recompute_step(unet, traj, k), rtol=1e-5, atol=1e-5)


def test_seeded_rollout_is_reproducible(unet, scheduler):
    a, _ = _run(unet, scheduler, 1.0, cfg=False)
    b, _ = _run(unet, scheduler, 1.0, cfg=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.noises, b.noises)


def test_plain_callable_model(scheduler):
    """Any module called as model(sample, t, encoder_hidden_states=...) works."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, sample, timestep, encoder_hidden_states=None):
            return self.w * sample

    traj = rlr_fast.rollout(Linear(), scheduler, torch.randn(2, 3), num_steps=4, eta=1.0)
    assert traj.latents.shape == (5, 2, 3)


@pytest.mark.slow
def test_rollout_and_estimate_under_autocast(unet, scheduler):
    """Autocast makes the UNet answer in bf16; the chain stays in the latents' fp32."""
    lora_unet = make_unet()
    rlr_fast.lora.add_lora(lora_unet, rank=2, alpha=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj, _ = _run(lora_unet, scheduler, 1.0, cfg=True, steps=4)
        stats = rlr_fast.estimate(lora_unet, traj, lambda x0: -x0.float().pow(2).flatten(1).mean(1), h=2)
    assert traj.latents.dtype == torch.float32 and torch.isfinite(traj.latents).all()
    assert stats["unet_backward"] > 0
    assert all(p.grad is not None for p in rlr_fast.lora.lora_parameters(lora_unet))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.slow
def test_stored_x0_hat_is_diffusers_pred_original_sample(unet, prediction, cfg):
    """store_x0_hat keeps each step's Tweedie estimate, from the guided output under CFG."""
    sched = make_scheduler(prediction_type=prediction)
    traj, kw = _run(unet, sched, 1.0, cfg, steps=4)
    assert traj.x0_hat is None
    traj, kw = _run(unet, sched, 1.0, cfg, steps=4, store_x0_hat=True)
    assert torch.equal(traj.latents, _run(unet, sched, 1.0, cfg, steps=4)[0].latents)  # the chain is unchanged
    ref = make_scheduler(prediction_type=prediction)
    ref.set_timesteps(4)
    for k, t in enumerate(ref.timesteps):
        x = traj.latents[k]
        out = unet(x, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample
        if cfg:
            e_u = unet(x, t, encoder_hidden_states=kw["negative_encoder_hidden_states"]).sample
            out = e_u + 5.0 * (out - e_u)
        want = ref.step(out, t, x, eta=1.0, variance_noise=traj.noises[k]).pred_original_sample
        torch.testing.assert_close(traj.x0_hat[k], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ---- bad input: one test each, each naming the bad value ------------------------------------


def _x(shape=(2, 4, 8, 8), dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def test_wrong_rank(unet, scheduler):
    with pytest.raises(ValueError, match=r"rank 3"):
        rlr_fast.rollout(unet, scheduler, _x((4, 8, 8)), num_steps=2, eta=0.0, encoder_hidden_states=_cond(1))


def test_wrong_channels(unet, scheduler):
    with pytest.raises(ValueError, match="3 channels but the model expects 4"):
        rlr_fast.rollout(unet, scheduler, _x((2, 3, 8, 8)), num_steps=2, eta=0.0, encoder_hidden_states=_cond(2))


def test_negative_eta(unet, scheduler):
    with pytest.raises(ValueError, match="eta must be >= 0, got -0.1"):
        rlr_fast.rollout(unet, scheduler, _x(), num_steps=2, eta=-0.1, encoder_hidden_states=_cond(2))


@pytest.mark.parametrize("steps", [0, 1001])
def test_num_steps_out_of_range(unet, scheduler, steps):
    with pytest.raises(ValueError, match=f"got {steps}"):
        rlr_fast.rollout(unet, scheduler, _x(), num_steps=steps, eta=0.0, encoder_hidden_states=_cond(2))


def test_guidance_without_negative(unet, scheduler):
    with pytest.raises(ValueError, match="guidance_scale=7.5 needs negative_encoder_hidden_states"):
        rlr_fast.rollout(unet, scheduler, _x(), num_steps=2, eta=0.0, encoder_hidden_states=_cond(2),
                         guidance_scale=7.5)


def test_integer_latents(unet, scheduler):
    with pytest.raises(TypeError, match="latents must be a floating-point tensor, got dtype torch.int64"):
        rlr_fast.rollout(unet, scheduler, _x(dtype=torch.int64), num_steps=2, eta=0.0,
                         encoder_hidden_states=_cond(2))


def test_batch_mismatch(unet, scheduler):
    with pytest.raises(ValueError, match="batch size 3 but latents have batch size 2"):
        rlr_fast.rollout(unet, scheduler, _x(), num_steps=2, eta=0.0, encoder_hidden_states=_cond(3))


def test_non_ddim_scheduler(unet):
    from diffusers import PNDMScheduler

    with pytest.raises(TypeError, match="DDIMScheduler"):
        rlr_fast.rollout(unet, PNDMScheduler(), _x(), num_steps=2, eta=0.0, encoder_hidden_states=_cond(2))


def test_samples_selected_joined_and_stored_as_tensors(unet, scheduler):
    """A subset of a trajectory's samples is the trajectory of those samples (the chain each one
    drew, step by step, under its own conditioning); joining subsets and a round trip through
    tensors + JSON (as checkpoints store trajectories) give back the original exactly."""
    import dataclasses

    from rlr_fast.rollout import (PER_SAMPLE_DIM, PER_STEP, Trajectory, concat_samples, select_samples,
                                  trajectory_from, trajectory_tensors)

    traj, _ = _run(unet, scheduler, 1.0, cfg=True, steps=3, batch=4, store_x0_hat=True)
    scalars = {"eta", "guidance_scale", "model_key"}
    assert {f.name for f in dataclasses.fields(Trajectory)} == set(PER_SAMPLE_DIM) | set(PER_STEP) | scalars
    pick = select_samples(traj, torch.tensor([2, 0]))
    assert pick.batch_size == 2 and torch.equal(pick.latents, traj.latents[:, [2, 0]])
    assert torch.equal(pick.noises[:, 0], traj.noises[:, 2]) and torch.equal(pick.log_probs, traj.log_probs[:, [2, 0]])
    assert torch.equal(pick.negative_encoder_hidden_states[1], traj.negative_encoder_hidden_states[0])
    mean = recompute_steps(unet, pick, [1])[0].detach()  # sample 0 of `pick` is sample 2 of `traj`
    torch.testing.assert_close(mean[0], recompute_steps(unet, traj, [1])[0, 2].detach())
    joined = concat_samples([select_samples(traj, torch.tensor([0, 1])), select_samples(traj, torch.tensor([2, 3]))])
    stored = trajectory_from(*trajectory_tensors(joined))
    for name in PER_SAMPLE_DIM:
        if getattr(traj, name) is None:
            assert getattr(stored, name) is None, name
        else:
            assert torch.equal(getattr(stored, name), getattr(traj, name)), name
    # under a prompt schedule the conditioning rows are distinct prompts, prompt_index the samples'
    steps, shape = torch.arange(traj.num_steps), traj.encoder_hidden_states.shape[1:]
    index = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    scheduled = dataclasses.replace(traj, encoder_hidden_states=traj.encoder_hidden_states[:2], prompt_index=index)
    per_sample = scheduled.step_conditioning(steps).reshape(3, 4, *shape)  # (T, B, L, D)
    for b in range(4):
        for k in range(3):
            assert torch.equal(per_sample[k, b], traj.encoder_hidden_states[index[k, b]])
    # two parts whose prompt rows differ: the joined trajectory must point each sample at its own part's rows
    other = dataclasses.replace(scheduled, encoder_hidden_states=traj.encoder_hidden_states[2:])
    parts = [select_samples(scheduled, torch.tensor([3, 1])), select_samples(other, torch.tensor([0, 2]))]
    joined = concat_samples(parts)
    expected = torch.cat([p.step_conditioning(steps).reshape(3, 2, *shape) for p in parts], 1)
    assert torch.equal(joined.step_conditioning(steps).reshape(3, 4, *shape), expected)
    # SQDF's states: each sample conditioned on its prompt at its own step
    from rlr_fast.sqdf import StepStates

    at = torch.tensor([2, 0, 1, 2])
    states = StepStates.of(scheduled, at)
    for b in range(4):
        assert torch.equal(states.encoder_hidden_states[b], per_sample[at[b], b])
    assert (stored.eta, stored.guidance_scale, stored.model_key) == (traj.eta, traj.guidance_scale, traj.model_key)
    other, _ = _run(unet, scheduler, 0.5, cfg=True, steps=3, batch=4)
    with pytest.raises(ValueError, match="one schedule, eta, guidance scale and model"):
        concat_samples([traj, other])
