"""Samplers as coefficients: DDIM's schedule against diffusers, and a sampler that is not DDIM through the
whole engine (rollout, recomputation, the CUDA-graph step, checkpoints, replay, the estimators)."""


import pytest
import torch

import rlr_fast
from rlr_fast.cuda_graph import GraphedRollout
from rlr_fast.replay import ReplayBuffer
from rlr_fast.rollout import recompute_steps, trajectory_from, trajectory_tensors
from rlr_fast.samplers import DDIMSampler, Sampler, StepSchedule, as_sampler, x0_coefficients
from rlr_fast.sqdf import StepStates, state_tweedie
from rlr_fast.testing import TOY_SCHEDULE, LinearEps, make_scheduler, max_z, toy_estimates


class SqueezedDDIM(Sampler):
    """DDIM's timesteps with other linear-Gaussian coefficients: a chain no DDIMScheduler gives, so code
    that computes DDIM's arithmetic instead of reading the schedule goes wrong on it."""

    max_steps_reason = "the toy scheduler's num_train_timesteps"

    def __init__(self, scheduler):
        self.ddim = DDIMSampler(scheduler)
        self.max_steps = self.ddim.max_steps

    def schedule(self, num_steps, eta):
        self.check(num_steps, eta)
        s = self.ddim.schedule(num_steps, eta)
        return StepSchedule(s.timesteps, 0.9 * s.c_x, 1.3 * s.c_e, 0.5 * s.sigmas + 0.05, 0.8 * s.d_x, 1.2 * s.d_e)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_x0_coefficients_are_the_schedulers_prediction(prediction_type):
    sched = make_scheduler(prediction_type=prediction_type)
    schedule = DDIMSampler(sched).schedule(7, 1.0)
    assert torch.equal(schedule.timesteps, sched.timesteps)  # left set as diffusers' loop sets it
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x, m = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for k, t in enumerate(sched.timesteps):
        want = sched.step(m, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).pred_original_sample
        torch.testing.assert_close(schedule.d_x[k] * x + schedule.d_e[k] * m, want, atol=1e-10, rtol=1e-10)
    d_x, d_e = x0_coefficients(sched)
    assert torch.equal(d_x, schedule.d_x) and torch.equal(d_e, schedule.d_e)


def test_sampler_arguments_and_conversion_errors():
    sampler = DDIMSampler(make_scheduler())
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\] \(num_train_timesteps\), got 0"):
        sampler.schedule(0, 1.0)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        sampler.schedule(2.0, 1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sampler.schedule(4, -0.1)
    assert as_sampler(sampler) is sampler
    with pytest.raises(TypeError, match="needs a diffusers DDIMScheduler, got str"):
        as_sampler("ddim")
    with pytest.raises(NotImplementedError):
        Sampler().schedule(2, 1.0)


def test_a_new_sampler_runs_the_engine_unchanged(unet):
    """Each step of the rollout is the schedule's arithmetic (not DDIM's); recomputation, the static
    CUDA-graph step, checkpoints, SQDF's states and the replay buffer carry the schedule as it is."""
    sampler = SqueezedDDIM(make_scheduler())
    g = torch.Generator().manual_seed(0)
    x_T, cond, negative = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), \
        torch.randn(2, 5, 16, generator=g)
    kw = dict(num_steps=4, eta=1.0, encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
              guidance_scale=3.0)
    traj = rlr_fast.rollout(unet, sampler, x_T, generator=torch.Generator().manual_seed(1), store_x0_hat=True, **kw)
    schedule = sampler.schedule(4, 1.0)
    assert traj.schedule.equal(schedule) and not traj.schedule.equal(DDIMSampler(make_scheduler()).schedule(4, 1.0))
    for k in range(4):
        x, t = traj.latents[k], traj.timesteps[k]
        e_u = unet(x, t, encoder_hidden_states=negative).sample
        e = e_u + 3.0 * (unet(x, t, encoder_hidden_states=cond).sample - e_u)
        want = schedule.c_x[k] * x + schedule.c_e[k] * e
        torch.testing.assert_close(traj.latents[k + 1], (want + schedule.sigmas[k] * traj.noises[k]).float())
        torch.testing.assert_close(traj.x0_hat[k], (schedule.d_x[k] * x + schedule.d_e[k] * e).float(), rtol=1e-5,
                                   atol=1e-4)
        torch.testing.assert_close(recompute_steps(unet, traj, [k])[0].detach(), want.float())
    static = GraphedRollout(unet, sampler, capture=False)(x_T, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(static.latents, traj.latents) and static.schedule.equal(traj.schedule)
    assert trajectory_from(*trajectory_tensors(traj)).schedule.equal(traj.schedule)
    states = StepStates.of(traj, torch.tensor([1, 3]))
    torch.testing.assert_close(state_tweedie(unet, states), traj.x0_hat[[1, 3], [0, 1]])
    buffer = ReplayBuffer(4, (0, 4), headroom=2).added(traj, torch.ones(2), torch.zeros(2), step=0)
    replayed = buffer.states(torch.tensor([0, 1]), torch.tensor([1, 3]), torch.device("cpu"), cond, negative)
    assert replayed.schedule.equal(schedule) and torch.equal(replayed.x, states.x)


Z_MAX = 4.0  # as tests/test_estimators.py
TARGET = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("method, opts", [
    ("full_bp", {}),
    ("rlr", dict(h=2, baseline="loo")),
    ("rlr", dict(h=2, baseline="value")),
    ("zo", dict(baseline="loo", zo_steps=3)),
], ids=["full_bp", "rlr-h2-loo", "rlr-h2-value", "zo-k3"])
def test_estimators_are_unbiased_under_a_new_sampler(method, opts, n=800, steps=6, batch=4):
    """The exact gradient follows from the new sampler's own schedule; every estimator must match it. Power:
    the likelihood-ratio terms scaled by DDIM's sigma instead of the schedule's (2x here, on purpose) give
    max |z| 4.7-6.2 at n = 500."""
    sched = make_scheduler(**TOY_SCHEDULE)
    sampler = SqueezedDDIM(sched)
    model = LinearEps(sched.alphas_cumprod, 3)
    est, exact = toy_estimates(model, sampler, method, n=n, steps=steps, eta=1.0, batch=batch, target=TARGET,
                               **opts)
    assert max_z(est, exact) < Z_MAX
