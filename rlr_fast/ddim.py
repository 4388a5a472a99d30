"""The DDIM step as rlr_fast computes it: coefficients, and the dispatcher to the fused op's backends.

docs/estimator.md §2 writes one step as

    x0_hat = (x_t - sqrt(1 - a) e) / sqrt(a)
    mu     = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) e
    x_prev = mu + sigma * noise

which is linear in (x_t, e). We fold the scheduler arithmetic into two per-step scalars,
mu = c_x * x_t + c_e * e, computed once in float64, so the fused op reads each element once
and the same op serves epsilon, v and sample prediction. Coefficients are per *sample* (not
per step) so one call can hold several timesteps, as the batched likelihood-ratio terms need.

Backends, all computing the same op (`ddim_step`) under one contract (kernels/reference.py:
inputs alike in shape, dtype and device, errors naming the one that is not; log-densities in
fp32 for fp16/bf16/fp32 inputs, fp64 for fp64):
  "reference"  kernels/reference.py, plain PyTorch: the specification the others are tested against
  "cpu"        rlr_fast._C, C++ (csrc/ddim_step.cpp), through rlr_fast/compiled.py
  "cuda"       rlr_fast._C, CUDA (csrc/ddim_step_cuda.cu) when built with nvcc, through compiled.py
  "triton"     kernels/ddim_step.py, on CUDA tensors when triton is installed
Each call runs inside the NVTX range "ddim_step" (rlr_fast.profiling), so Nsight tools can
select the fused kernel: `ncu --nvtx --nvtx-include "ddim_step/"`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _C, compiled
from .kernels.reference import (check_tensor, ddim_step_reference, gaussian_log_prob_reference,  # noqa: F401
                                log_density_dtype)
from .options import BACKENDS
from .profiling import nvtx_range



@dataclass(frozen=True)
class StepCoefficients:
    """Per-step constants of a DDIM schedule, float64, in `scheduler.timesteps` order."""

    timesteps: torch.Tensor  # (T,) int64
    c_x: torch.Tensor  # (T,) coefficient of x_t in the mean
    c_e: torch.Tensor  # (T,) coefficient of the model output in the mean
    sigmas: torch.Tensor  # (T,) standard deviation of the step's noise


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


def step_coefficients(scheduler, eta: float) -> StepCoefficients:
    """The per-step (c_x, c_e, sigma) of `scheduler.timesteps` after `set_timesteps`.

    Follows `DDIMScheduler.step`: previous timestep = t - num_train_timesteps // T, whatever
    the timestep spacing, and `final_alpha_cumprod` below timestep 0.
    """
    check_scheduler(scheduler)
    cfg = scheduler.config
    num_steps = scheduler.num_inference_steps
    timesteps = scheduler.timesteps.to("cpu", torch.int64)
    alphas = scheduler.alphas_cumprod.to("cpu", torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    prev_t = timesteps - cfg.num_train_timesteps // num_steps
    a = alphas[timesteps]
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()  # coefficient of eps in the mean
    if cfg.prediction_type == "epsilon":  # x0 = (x - sqrt(1-a) m) / sqrt(a), eps = m
        c_x = a_prev.sqrt() / a.sqrt()
        c_e = direction - a_prev.sqrt() * (1 - a).sqrt() / a.sqrt()
    elif cfg.prediction_type == "v_prediction":  # x0 = sqrt(a) x - sqrt(1-a) m, eps = sqrt(a) m + sqrt(1-a) x
        c_x = a_prev.sqrt() * a.sqrt() + direction * (1 - a).sqrt()
        c_e = -a_prev.sqrt() * (1 - a).sqrt() + direction * a.sqrt()
    else:  # sample: x0 = m, eps = (x - sqrt(a) m) / sqrt(1-a)
        c_x = direction / (1 - a).sqrt()
        c_e = a_prev.sqrt() - direction * a.sqrt() / (1 - a).sqrt()
    return StepCoefficients(timesteps, c_x, c_e, sigma)


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


def gaussian_log_prob(sample, mean, sigma, *, backend="auto"):
    """log N(sample; mean, sigma^2 I) summed over each sample's elements: (B,) in fp32 (fp64 for
    fp64 inputs), by the Triton kernel where `resolve_backend` picks "triton", else by the reference.

    Differentiable in sample and mean (not sigma). No compiled `_C` op exists for it, so the
    "cpu" and "cuda" backends use the reference.
    """
    check_tensor("sample", sample)
    if resolve_backend(sample.device, backend) == "triton":
        from .kernels.gaussian_log_prob import gaussian_log_prob as triton_gaussian_log_prob
        return triton_gaussian_log_prob(sample, mean, sigma)
    return gaussian_log_prob_reference(sample, mean, sigma)


def _triton_available() -> bool:
    try:
        from .kernels import ddim_step as _  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend `ddim_step` uses for tensors on `device`.

    `auto` (or the RLR_FAST_BACKEND environment variable) prefers Triton, then the CUDA
    kernels of `_C` on a GPU, and `_C`'s C++ on the CPU.
    """
    backend = os.environ.get("RLR_FAST_BACKEND", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown ddim backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if _triton_available():
            return "triton"
        return "cuda" if _C.has_cuda() else "reference"
    return "cpu" if device.type == "cpu" else "reference"


def ddim_step(sample, model_output, noise, c_x, c_e, sigma, *, model_output_cond=None,
              guidance_scale=1.0, backend="auto"):
    """One fused DDIM step and the log-density of the sample it draws.

    sample (B, ...): x_t.  model_output (B, ...): the UNet output (the unconditional one when
    `model_output_cond` is given; guidance combines e_u + w (e_c - e_u)).  noise (B, ...): the
    step's standard normal noise; all of them alike in shape, dtype and device.  c_x, c_e,
    sigma (B,): per-sample coefficients (`step_coefficients`), any float dtype and device.
    Returns (prev_sample, mean, log_prob): prev and mean in the inputs' dtype, log_prob (B,) the
    Gaussian log-density of prev_sample summed over elements, in fp32 (fp64 for fp64 inputs),
    0 where sigma == 0 (no density). Differentiable in sample, model outputs and noise (the
    reference backend also in the coefficients).
    """
    check_tensor("sample", sample)
    name = resolve_backend(sample.device, backend)
    with nvtx_range("ddim_step"):
        if name == "reference":
            return ddim_step_reference(sample, model_output, noise, c_x, c_e, sigma,
                                       model_output_cond=model_output_cond, guidance_scale=guidance_scale)
        if name == "triton":
            from .kernels.ddim_step import ddim_step as triton_ddim_step
            return triton_ddim_step(sample, model_output, noise, c_x, c_e, sigma,
                                    model_output_cond=model_output_cond, guidance_scale=guidance_scale)
        if sample.device.type != name:
            raise ValueError(f"backend {name!r} runs on {name} tensors, but sample is on {sample.device}")
        if name == "cuda" and not _C.has_cuda():
            raise RuntimeError("backend 'cuda' asked for, but rlr_fast._C was built without CUDA; rebuild it "
                               "with `pip install -e . --no-build-isolation` where nvcc and a CUDA torch are")
        return compiled.ddim_step(sample, model_output, noise, c_x, c_e, sigma, model_output_cond=model_output_cond,
                                  guidance_scale=guidance_scale)
