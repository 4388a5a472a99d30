"""The fused sampling step and its Gaussian log-density: the dispatcher to the op's backends.

Every step rlr_fast samples has a mean linear in (x_t, e), e the model output (with guidance,
e = e_u + w (e_c - e_u)): mu = c_x * x_t + c_e * e, x_prev = mu + sigma * noise. The sampler
(rlr_fast/samplers.py) folds its arithmetic (DDIM's is docs/estimator.md §2) into those per-step
scalars, computed once in float64, so the fused op reads each element once and serves any sampler
and any prediction type. The op keeps its first sampler's name, `ddim_step`. Coefficients are per
*sample* (not per step) so one call can hold several timesteps, as the batched likelihood-ratio
terms need.

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

import torch

from . import compiled
from .kernels.reference import (check_tensor, ddim_step_reference, gaussian_log_prob_reference,  # noqa: F401
                                log_density_dtype)
from .options import BACKENDS
from .profiling import nvtx_range



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


def triton_available() -> bool:
    try:
        from .kernels import ddim_step as _  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend `ddim_step` uses for tensors on `device`.

    `auto` (or the RLR_FAST_BACKEND environment variable) prefers Triton, then the CUDA
    kernels of `_C` on a GPU, and `_C`'s C++ on the CPU; the reference where those are missing.
    """
    backend = os.environ.get("RLR_FAST_BACKEND", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown ddim backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if triton_available():
            return "triton"
        return "cuda" if compiled.has_cuda() else "reference"
    return "cpu" if device.type == "cpu" and compiled.available() else "reference"


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
        if not compiled.available():
            raise RuntimeError(f"backend {name!r} asked for, but {compiled.MISSING}")
        if name == "cuda" and not compiled.has_cuda():
            raise RuntimeError("backend 'cuda' asked for, but rlr_fast._C was built without CUDA; rebuild it "
                               "with `pip install -e . --no-build-isolation` where nvcc and a CUDA torch are")
        return compiled.ddim_step(sample, model_output, noise, c_x, c_e, sigma, model_output_cond=model_output_cond,
                                  guidance_scale=guidance_scale)
