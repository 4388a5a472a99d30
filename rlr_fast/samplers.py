"""Samplers as coefficients: what one sampling step is, as six per-step tables.

Every step rlr_fast samples is a Gaussian transition whose mean is linear in (x_t, m), m the model's
output at x_t, and so is the estimate of x_0 it implies:

    mean   = c_x x_t + c_e m          x_{t-1} = mean + sigma noise
    x0_hat = d_x x_t + d_e m          (the Tweedie estimate the value baseline and SQDF score)

A sampler turns (number of steps T, noise level eta) into a `StepSchedule`: those five coefficients
per step, float64, and `timesteps`, the time input the network is called with at each step. Everything
downstream reads only the schedule (the fused step and its log-density in ddim.py, the sweeps, CUDA
graphs, value baselines, SQDF, design/ and plan/): a new sampler is a new `Sampler` subclass here, and
nothing there changes. The fused op keeps its historical name `ddim_step`, but it computes the
generic step above.

    DDIMSampler   a diffusers DDIMScheduler (epsilon, v or sample prediction): the step of
                  `DDIMScheduler.step(m, t, x, eta, variance_noise=noise)`, docs/estimator.md §2

A flow-matching SDE (velocity m, sigma_t = a sqrt(t / (1 - t)) from the scheduler's shifted sigmas,
mean linear in (x_t, m), x0_hat = x_t - t m) is one more subclass with float timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

TABLES = ("timesteps", "c_x", "c_e", "sigmas", "d_x", "d_e")


@dataclass(frozen=True)
class StepSchedule:
    """The per-step tables of one sampling chain, each (T,), in sampling order (step 0 the noisiest)."""

    timesteps: torch.Tensor  # the network's time input (int64 for DDIM)
    c_x: torch.Tensor  # float64 from here on: mean = c_x * x_t + c_e * model_output
    c_e: torch.Tensor
    sigmas: torch.Tensor  # std of each step's noise (0: a deterministic step)
    d_x: torch.Tensor  # x0_hat = d_x * x_t + d_e * model_output
    d_e: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: Union[torch.device, str]) -> "StepSchedule":
        return StepSchedule(*(getattr(self, name).to(device) for name in TABLES))

    def tables(self) -> dict[str, torch.Tensor]:
        """The tables by name (for checkpoints); `StepSchedule(**tables)` rebuilds the schedule."""
        return {name: getattr(self, name) for name in TABLES}

    def equal(self, other: "StepSchedule") -> bool:
        """Whether `other` holds the same tables, value for value (on any device)."""
        return all(torch.equal(getattr(self, n).cpu(), getattr(other, n).cpu()) for n in TABLES)

    def at(self, steps: torch.Tensor) -> "StepSchedule":
        """The tables at `steps` (any shape of step indices): one entry per index, e.g. per sample."""
        return StepSchedule(*(getattr(self, name)[steps] for name in TABLES))


class Sampler:
    """Gives the `StepSchedule` of T steps at noise level eta, and refuses (`check`) what it cannot sample.

    A subclass sets `max_steps` (and says why in `max_steps_reason`) and implements `schedule`.
    """

    max_steps: int
    max_steps_reason: str = "the most steps this sampler takes"

    def check(self, num_steps: int, eta: float) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int):
            raise TypeError(f"num_steps must be an int, got {num_steps!r}")
        if not 1 <= num_steps <= self.max_steps:
            raise ValueError(f"num_steps must be in [1, {self.max_steps}] ({self.max_steps_reason}), got {num_steps}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

    def schedule(self, num_steps: int, eta: float) -> StepSchedule:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# DDIM


def check_scheduler(scheduler) -> None:
    """Raise a clear error for schedulers or settings whose step is not the linear DDIM step."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(
            f"rlr_fast needs a diffusers DDIMScheduler, got {type(scheduler).__name__}; convert it "
            "with `DDIMScheduler.from_config(scheduler.config)` (same noise schedule, DDIM sampling)"
        )
    cfg = scheduler.config
    if cfg.thresholding or cfg.clip_sample:
        raise ValueError(
            "DDIMScheduler with clip_sample=True or thresholding=True makes the step nonlinear in the "
            "model output; Stable Diffusion uses neither: build it with clip_sample=False, "
            "thresholding=False (e.g. DDIMScheduler.from_config(cfg, clip_sample=False))"
        )
    if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")


def _alphas(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphabar_t, alphabar_prev), (T,) float64 each, of `scheduler.timesteps` after `set_timesteps`.

    Follows `DDIMScheduler.step`: previous timestep = t - num_train_timesteps // T, whatever the
    timestep spacing, and `final_alpha_cumprod` below timestep 0.
    """
    timesteps = scheduler.timesteps.to("cpu", torch.int64)
    alphas = scheduler.alphas_cumprod.to("cpu", torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    prev_t = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return alphas[timesteps], torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final)


def step_coefficients(scheduler, eta: float) -> StepSchedule:
    """The DDIM `StepSchedule` of `scheduler.timesteps` (after `set_timesteps`) at noise level eta."""
    check_scheduler(scheduler)
    a, a_prev = _alphas(scheduler)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()  # coefficient of eps in the mean
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":  # x0 = (x - sqrt(1-a) m) / sqrt(a), eps = m
        c_x = a_prev.sqrt() / a.sqrt()
        c_e = direction - a_prev.sqrt() * (1 - a).sqrt() / a.sqrt()
    elif prediction == "v_prediction":  # x0 = sqrt(a) x - sqrt(1-a) m, eps = sqrt(a) m + sqrt(1-a) x
        c_x = a_prev.sqrt() * a.sqrt() + direction * (1 - a).sqrt()
        c_e = -a_prev.sqrt() * (1 - a).sqrt() + direction * a.sqrt()
    else:  # sample: x0 = m, eps = (x - sqrt(a) m) / sqrt(1-a)
        c_x = direction / (1 - a).sqrt()
        c_e = a_prev.sqrt() - direction * a.sqrt() / (1 - a).sqrt()
    d_x, d_e = x0_coefficients(scheduler)
    return StepSchedule(scheduler.timesteps.to("cpu", torch.int64), c_x, c_e, sigma, d_x, d_e)


def x0_coefficients(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_x, d_e), each (T,) float64: the Tweedie estimate x0_hat = d_x * x_t + d_e * model_output of
    every step of `scheduler.timesteps` (DDIMScheduler.step's pred_original_sample)."""
    check_scheduler(scheduler)
    a = scheduler.alphas_cumprod.to("cpu", torch.float64)[scheduler.timesteps.to("cpu", torch.int64)]
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return 1 / a.sqrt(), -(1 - a).sqrt() / a.sqrt()
    if prediction == "v_prediction":
        return a.sqrt(), -(1 - a).sqrt()
    return torch.zeros_like(a), torch.ones_like(a)


class DDIMSampler(Sampler):
    """DDIM over a diffusers `DDIMScheduler` (clip_sample and thresholding off). `schedule` calls
    `scheduler.set_timesteps(num_steps)`, so the scheduler is left set up as diffusers' own loop would."""

    max_steps_reason = "num_train_timesteps"

    def __init__(self, scheduler):
        check_scheduler(scheduler)
        self.scheduler = scheduler
        self.max_steps = scheduler.config.num_train_timesteps

    def schedule(self, num_steps: int, eta: float) -> StepSchedule:
        self.check(num_steps, eta)
        self.scheduler.set_timesteps(num_steps)
        return step_coefficients(self.scheduler, eta)


def as_sampler(sampler_or_scheduler) -> Sampler:
    """A `Sampler` as given; a diffusers scheduler as the sampler of its kind (DDIMScheduler: DDIM), or a
    clear error naming what it is."""
    if isinstance(sampler_or_scheduler, Sampler):
        return sampler_or_scheduler
    return DDIMSampler(sampler_or_scheduler)

