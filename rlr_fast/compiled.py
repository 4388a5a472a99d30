"""The compiled fused DDIM step (`rlr_fast._C`: C++ on the CPU, CUDA on a GPU) as a differentiable op.

rlr_fast imports without _C (a source tree, a failed build): `available()` is then False, `MISSING`
says why, and rlr_fast.ddim dispatches to Triton (CUDA) or the PyTorch reference (CPU) instead.

csrc/ holds the arithmetic and the input checks; this module is a backend of the op's one autograd
Function (kernels/ddim_step_function.py), as kernels/ddim_step.py is for the Triton kernels: its two
launchers put _C's entry points in the Function's argument order,

    _C.ddim_step_forward(sample, model_output, model_output_cond, guidance_scale, noise, c_x, c_e, sigma)
        -> (prev, mean, log_prob)
    _C.ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, guidance_scale, has_cond, c_x, c_e,
                          sigma, need_sample, need_model_output, need_model_output_cond, need_noise)
        -> (grad_sample, grad_model_output, grad_model_output_cond, grad_noise)
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .kernels.ddim_step_function import fused_ddim_step

try:
    from . import _C
    MISSING = None
except ImportError as e:  # not built, its build failed, or built against another torch
    _C = None
    MISSING = (f"rlr_fast._C could not be imported ({' '.join(str(e).split())}); build it from the repository "
               "root with `pip install -e . --no-build-isolation` (after torch, see README)")


def available() -> bool:
    """Whether rlr_fast._C imported (else `MISSING` says why, and ddim falls back to Triton or the reference)."""
    return _C is not None


def has_cuda() -> bool:
    """Whether rlr_fast._C imported with its CUDA kernels compiled in."""
    return _C is not None and bool(_C.has_cuda())


def built_against_torch() -> Optional[str]:
    return None if _C is None else _C.torch_version


def ddim_step_forward(sample, model_output, model_output_cond, noise, c_x, c_e, sigma, guidance_scale: float):
    # a tuple, as autograd needs a Function's outputs (the binding returns a list)
    return tuple(_C.ddim_step_forward(sample, model_output, model_output_cond, guidance_scale, noise, c_x, c_e,
                                      sigma))


def ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, c_x, c_e, sigma, guidance_scale: float,
                       has_cond: bool, need: tuple[bool, bool, bool, bool]):
    return _C.ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, guidance_scale, has_cond, c_x, c_e, sigma,
                                 *need)


def ddim_step(sample: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor, c_x: torch.Tensor,
              c_e: torch.Tensor, sigma: torch.Tensor, *, model_output_cond: Optional[torch.Tensor] = None,
              guidance_scale: float = 1.0):
    """The fused DDIM step on rlr_fast._C; arguments and results as `rlr_fast.ddim.ddim_step` (the
    coefficients are not differentiated: a coefficient that requires grad is an error)."""
    return fused_ddim_step(sys.modules[__name__], sample, model_output, noise, c_x, c_e, sigma,
                           model_output_cond=model_output_cond, guidance_scale=guidance_scale)
