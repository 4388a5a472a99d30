"""The compiled fused DDIM step (`rlr_fast._C`: C++ on the CPU, CUDA on a GPU) as a differentiable op.

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

from . import _C
from .kernels.ddim_step_function import fused_ddim_step


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
