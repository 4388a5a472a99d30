"""The compiled fused DDIM step (`rlr_fast._C`: C++ on the CPU, CUDA on a GPU) as a differentiable op.

csrc/ holds the arithmetic and the input checks; this module wires its two entry points into
autograd, as kernels/ddim_step.py does for the Triton kernels:

    _C.ddim_step_forward(sample, model_output, model_output_cond, guidance_scale, noise, c_x, c_e, sigma)
        -> (prev, mean, log_prob)
    _C.ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, guidance_scale, has_cond, c_x, c_e,
                          sigma, need_sample, need_model_output, need_model_output_cond, need_noise)
        -> (grad_sample, grad_model_output, grad_model_output_cond, grad_noise)

Cotangents autograd does not provide stay None (never materialised as zeros), and the backward
computes only the input gradients autograd asks for (ctx.needs_input_grad): the hot caller,
recompute_steps, needs only the model outputs' gradients through the mean.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C
from .kernels.reference import check_step_inputs


class DDIMStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sample, model_output, model_output_cond, noise, c_x, c_e, sigma, guidance_scale):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(noise, c_x, c_e, sigma)
        ctx.guidance_scale = guidance_scale
        ctx.has_cond = model_output_cond is not None
        prev, mean, log_prob = _C.ddim_step_forward(sample, model_output, model_output_cond, guidance_scale, noise,
                                                    c_x, c_e, sigma)
        return prev, mean, log_prob

    @staticmethod
    def backward(ctx, grad_prev, grad_mean, grad_logp):
        needs = ctx.needs_input_grad[:4]  # sample, model_output, model_output_cond, noise
        if not any(needs):
            return (None,) * 8
        noise, c_x, c_e, sigma = ctx.saved_tensors
        grads = _C.ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, ctx.guidance_scale, ctx.has_cond,
                                      c_x, c_e, sigma, *needs)
        return (*grads, None, None, None, None)


def ddim_step(sample: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor, c_x: torch.Tensor,
              c_e: torch.Tensor, sigma: torch.Tensor, *, model_output_cond: Optional[torch.Tensor] = None,
              guidance_scale: float = 1.0):
    """The fused DDIM step on rlr_fast._C; arguments and results as `rlr_fast.ddim.ddim_step`.

    The coefficients are not differentiated (a coefficient that requires grad is an error), and are
    converted once here to float64 on the samples' device, so the backward reuses them as they are.
    """
    check_step_inputs(sample, model_output, noise, c_x, c_e, sigma, model_output_cond, guidance_scale,
                      differentiable_coefficients=False)
    c_x, c_e, sigma = (c.detach().to(sample.device, torch.float64).reshape(-1).contiguous()
                       for c in (c_x, c_e, sigma))
    return DDIMStepFunction.apply(sample, model_output, model_output_cond, noise, c_x, c_e, sigma,
                                  float(guidance_scale))
