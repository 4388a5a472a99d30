"""The ops' specification in plain PyTorch: input contract, output dtypes, math.

Every backend of the fused DDIM step and of the Gaussian log-density (these Triton kernels,
the compiled `rlr_fast._C` ops in csrc/, and this file) is tested against the functions below,
and all of them keep one contract:

- sample, model_output, noise (and model_output_cond) share one shape, floating dtype and
  device; an input that does not is named in a ValueError (shape, device) or TypeError (dtype).
- per-sample coefficients (c_x, c_e, sigma) hold one value per sample, in any float dtype, on
  any device: they are moved to the samples' device.
- log-densities come back in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs
  (`log_density_dtype`): a log-density summed over a 4x64x64 latent is ~10^4-10^5, beyond
  fp16's range, and bf16 would keep only its first 3 digits.

Torch only, like the rest of this package it never imports rlr_fast (rlr_fast.ddim re-exports
these functions).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def log_density_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log-densities of `dtype` inputs come back in, and every backend's arithmetic
    type for them: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, like: Optional[torch.Tensor] = None) -> None:
    """Raise TypeError / ValueError naming `name` for an input the ops cannot take; with `like`,
    for one that differs from it in shape, dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if like is None:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the ops take {SUPPORTED_DTYPES}")
        if t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty tensor with a batch dimension, got shape "
                             f"{tuple(t.shape)}")
        return
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device} like the sample")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} like the sample")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype} like the sample")


def check_coefficient(name: str, t, batch: int, *, differentiable: bool) -> None:
    """A per-sample coefficient: a float tensor of `batch` values, on any device; with
    `differentiable` False (the kernels) it must not require grad, which they would drop."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({batch},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.numel() != batch:
        raise ValueError(f"{name} must hold one value per sample ({batch}), got shape {tuple(t.shape)}")
    if t.requires_grad and not differentiable:
        raise ValueError(f"{name} requires grad, but the fused kernels do not differentiate it; pass "
                         f"{name}.detach() or use the reference backend")


def check_step_inputs(sample, model_output, noise, c_x, c_e, sigma, model_output_cond=None, guidance_scale=1.0,
                      *, differentiable_coefficients: bool = True) -> None:
    """The fused step's input contract (module docstring), with errors naming the bad input."""
    check_tensor("sample", sample)
    check_tensor("model_output", model_output, like=sample)
    check_tensor("noise", noise, like=sample)
    if model_output_cond is not None:
        check_tensor("model_output_cond", model_output_cond, like=sample)
    for name, t in (("c_x", c_x), ("c_e", c_e), ("sigma", sigma)):
        check_coefficient(name, t, sample.shape[0], differentiable=differentiable_coefficients)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a float, got {guidance_scale!r}")


def check_log_prob_inputs(sample, mean, sigma, *, differentiable_sigma: bool = True) -> None:
    """The log-density's input contract: sample and mean alike, one sigma per sample."""
    check_tensor("sample", sample)
    check_tensor("mean", mean, like=sample)
    check_coefficient("sigma", sigma, sample.shape[0], differentiable=differentiable_sigma)


def _per_sample(v: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) on `like`'s device, broadcasting over a sample's elements."""
    return v.to(like.device, dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def ddim_step_reference(sample, model_output, noise, c_x, c_e, sigma, *, model_output_cond=None,
                        guidance_scale=1.0):
    """(prev_sample, mean, log_prob) of one DDIM step: mean and prev computed in fp32 (fp64 for
    fp64) and rounded once to the inputs' dtype, log_prob (B,) in `log_density_dtype`, 0 where
    sigma == 0 (a deterministic step has no density).

        e    = u + w (c - u)     (guidance, when model_output_cond c is given; else e = u)
        mean = c_x x + c_e e,    prev = mean + sigma noise
        logp = -|noise|^2 / 2 - D log sigma - D/2 log 2 pi      (the density of prev given x)

    logp does not depend on x or e: prev moves with the mean. Autograd gives the backward.
    """
    check_step_inputs(sample, model_output, noise, c_x, c_e, sigma, model_output_cond, guidance_scale)
    dtype, acc = sample.dtype, log_density_dtype(sample.dtype)  # no-op casts for fp32 and fp64 inputs
    e = model_output.to(acc)
    if model_output_cond is not None:
        e = e + guidance_scale * (model_output_cond.to(acc) - e)
    mean = _per_sample(c_x, sample, acc) * sample.to(acc) + _per_sample(c_e, sample, acc) * e
    prev = mean + _per_sample(sigma, sample, acc) * noise.to(acc)
    s = sigma.to(sample.device, torch.float64)
    logp = -0.5 * noise.double().flatten(1).pow(2).sum(1) - sample[0].numel() * (
        s.clamp(min=1e-300).log() + HALF_LOG_2PI)
    return prev.to(dtype), mean.to(dtype), torch.where(s > 0, logp, 0.0).to(acc)


def gaussian_log_prob_reference(sample, mean, sigma):
    """log N(sample; mean, sigma^2 I) summed over each sample's elements: (B,) in
    `log_density_dtype`. sigma must be > 0. Autograd gives the backward (in sample and mean)."""
    check_log_prob_inputs(sample, mean, sigma)
    dtype = log_density_dtype(sample.dtype)
    z = (sample.to(dtype) - mean.to(dtype)) / _per_sample(sigma, sample, dtype)
    return -0.5 * z.flatten(1).pow(2).sum(1) - sample[0].numel() * (
        sigma.to(sample.device, dtype).log() + HALF_LOG_2PI)
