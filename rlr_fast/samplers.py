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
    FlowSampler   a diffusers FlowMatchEulerDiscreteScheduler (SD3, FLUX: velocity prediction): the
                  flow SDE with the ODE's marginals at noise level a (eta), Flow-GRPO's conversion;
                  a = 0 is the scheduler's own Euler step. docs/estimator.md §14
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

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


# ----------------------------------------------------------------------------------------------
# Flow matching


# Flow-GRPO's noise level (its sd3_sde_with_logprob default): exploration enough for RL, images still clean.
FLOW_NOISE_LEVEL = 0.7


def check_flow_scheduler(scheduler) -> None:
    """Raise a clear error for a scheduler whose step is not the Euler step on decreasing sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"FlowSampler needs a diffusers FlowMatchEulerDiscreteScheduler, got "
                        f"{type(scheduler).__name__}")
    for key in ("invert_sigmas", "stochastic_sampling"):
        if scheduler.config.get(key):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler with {key}=True is not the Euler step on decreasing "
                             f"sigmas the flow SDE is built on; build it with {key}=False")


def calculate_shift(image_seq_len: int, config) -> float:
    """mu of a resolution-dependent shift: linear in the image's token count between the scheduler
    config's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the SD3 and FLUX
    pipelines compute it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def flow_sde_coefficients(sigmas: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, ...]:
    """(c_x, c_e, sigma, d_x, d_e), each (T,) float64, of the flow SDE on the T + 1 decreasing `sigmas`
    (the scheduler's, ending at 0) at noise level a = `noise_level`.

    x_t = (1 - t) x_0 + t noise, velocity v = noise - x_0, so x0_hat = x_t - t v and the score is
    -(x_t + (1 - t) v) / t. Reverse time keeps the ODE's marginals with any diffusion g_t if the drift
    gains (g_t^2 / 2) (x_t + (1 - t) v) / t; Euler-Maruyama over dt = t_next - t < 0 then gives
        mean  = x_t (1 + g^2 dt / (2t)) + v dt (1 + g^2 (1 - t) / (2t)),   std = g sqrt(-dt),
    g_t = a sqrt(t / (1 - t)) (Flow-GRPO), with 1 - t at t = 1 taken at the second sigma (as Flow-GRPO:
    the first step stays finite). a = 0: mean = x_t + v dt, the scheduler's Euler step.
    """
    sigmas = sigmas.to("cpu", torch.float64)
    t, dt = sigmas[:-1], sigmas[1:] - sigmas[:-1]
    second = sigmas[1] if len(sigmas) > 2 else torch.zeros((), dtype=torch.float64)
    g2 = noise_level**2 * t / (1 - torch.where(t == 1, second, t))
    c_x = 1 + g2 * dt / (2 * t)
    c_e = dt * (1 + g2 * (1 - t) / (2 * t))
    return c_x, c_e, (g2 * -dt).sqrt(), torch.ones_like(t), -t


class FlowSampler(Sampler):
    """The flow SDE over a diffusers `FlowMatchEulerDiscreteScheduler` (`flow_sde_coefficients`); eta is
    its noise level a (FLOW_NOISE_LEVEL, Flow-GRPO's 0.7, is what flow runs default to), and eta = 0 is
    the deterministic Euler ODE of the diffusers pipelines.

    The sigmas are the pipeline's: `set_timesteps(T)` shifted by the config's `shift` (SD3), or with
    `linear_sigmas` FLUX's np.linspace(1, 1/T, T) before shifting; with use_dynamic_shifting the shift's
    mu follows the image's token count, `image_seq_len` (`set_image_seq_len`: the family's models set it
    for the run's resolution). Timesteps are float (sigma * num_train_timesteps), as the pipelines pass
    them to the network (FLUX's adapter divides by 1000, as FluxPipeline)."""

    max_steps_reason = "the scheduler's num_train_timesteps"

    def __init__(self, scheduler, *, linear_sigmas: bool = False, image_seq_len: Optional[int] = None):
        check_flow_scheduler(scheduler)
        self.scheduler, self.linear_sigmas, self.image_seq_len = scheduler, linear_sigmas, image_seq_len
        self.max_steps = scheduler.config.num_train_timesteps

    @property
    def config(self):
        return self.scheduler.config

    def set_image_seq_len(self, image_seq_len: int) -> None:
        self.image_seq_len = int(image_seq_len)

    def set_timesteps(self, num_steps: int) -> None:
        """`scheduler.set_timesteps` as the family's pipeline calls it for `num_steps` steps."""
        import numpy as np

        mu = None
        if self.config.use_dynamic_shifting:
            if self.image_seq_len is None:
                raise ValueError("this scheduler shifts its sigmas by the image size (use_dynamic_shifting): set the "
                                 "sampler's image_seq_len (the latent's token count) first")
            mu = calculate_shift(self.image_seq_len, self.config)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if self.linear_sigmas else None
        self.scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)

    def schedule(self, num_steps: int, eta: float) -> StepSchedule:
        self.check(num_steps, eta)
        self.set_timesteps(num_steps)
        sigmas = self.scheduler.sigmas
        if not bool((sigmas[:-1] > 0).all() and (sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError(f"the flow SDE needs positive, decreasing sigmas; the scheduler gives {sigmas.tolist()}")
        timesteps = self.scheduler.timesteps.to("cpu", torch.float32)
        return StepSchedule(timesteps, *flow_sde_coefficients(sigmas, float(eta)))


def as_sampler(sampler_or_scheduler) -> Sampler:
    """A `Sampler` as given; a diffusers scheduler as the sampler of its kind (DDIMScheduler: DDIM,
    FlowMatchEulerDiscreteScheduler: the flow SDE), or a clear error naming what it is."""
    if isinstance(sampler_or_scheduler, Sampler):
        return sampler_or_scheduler
    if type(sampler_or_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        return FlowSampler(sampler_or_scheduler)
    return DDIMSampler(sampler_or_scheduler)

