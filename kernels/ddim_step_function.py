"""The fused step's one autograd Function, over any backend that launches its forward and backward.

A backend is a module with two launchers (inputs already checked and contiguous, the coefficients
float64 (B,) on the tensors' device):

    ddim_step_forward(sample, model_output, model_output_cond, noise, c_x, c_e, sigma, guidance_scale)
        -> (prev, mean, log_prob)
    ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, c_x, c_e, sigma, guidance_scale, has_cond, need)
        -> (grad_sample, grad_model_output, grad_model_output_cond, grad_noise)

kernels/ddim_step.py (Triton) is one, rlr_fast/compiled.py (rlr_fast._C: C++ and CUDA) another. The
launchers are looked up on the module at each call, so a test can spy on them.

What the Function does the same for every backend: cotangents autograd does not provide stay None
(never materialised as zeros), and the backward asks only for the input gradients autograd needs
(ctx.needs_input_grad): the hot caller, recompute_steps, needs only the model outputs' gradients
through the mean. The coefficients are not differentiated (a coefficient that requires grad is an
error: use the reference backend, kernels/reference.py, which differentiates them).

Torch only, like reference.py: the compiled backend works where triton is not installed.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from .reference import check_step_inputs


class DDIMStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: ModuleType, sample, model_output, model_output_cond, noise, c_x, c_e, sigma,
                guidance_scale):
        ctx.set_materialize_grads(False)  # unused outputs stay None: no zero tensors to read
        ctx.save_for_backward(noise, c_x, c_e, sigma)
        ctx.backend = backend
        ctx.guidance_scale = guidance_scale
        ctx.has_cond = model_output_cond is not None
        return backend.ddim_step_forward(sample, model_output, model_output_cond, noise, c_x, c_e, sigma,
                                         guidance_scale)

    @staticmethod
    def backward(ctx, grad_prev, grad_mean, grad_logp):
        need = tuple(ctx.needs_input_grad[1:5])  # sample, model_output, model_output_cond, noise
        if not any(need):
            return (None,) * 9
        noise, c_x, c_e, sigma = ctx.saved_tensors
        grads = ctx.backend.ddim_step_backward(grad_prev, grad_mean, grad_logp, noise, c_x, c_e, sigma,
                                               ctx.guidance_scale, ctx.has_cond, need)
        return (None, *grads, None, None, None, None)


def fused_ddim_step(backend: ModuleType, sample: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor,
                    c_x: torch.Tensor, c_e: torch.Tensor, sigma: torch.Tensor, *,
                    model_output_cond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0):
    """One fused step on `backend` and the log-density of its draw: (prev_sample, mean, log_prob).

    sample, model_output, noise (and model_output_cond with guidance) (B, ...): same shape, dtype
    (fp16, bf16, fp32, fp64) and device. c_x, c_e, sigma (B,): per-sample coefficients, any float
    dtype and device, not differentiated; converted once here to float64 on the samples' device
    (float64 keeps the sampler's values exact; a kernel reads one per program, so the width costs
    nothing). log_prob (B,) is fp32 (fp64 for fp64 input: a summed log-density of 4x64x64 elements
    overflows fp16), 0 where sigma == 0. Differentiable in sample, model outputs and noise.
    """
    check_step_inputs(sample, model_output, noise, c_x, c_e, sigma, model_output_cond, guidance_scale,
                      differentiable_coefficients=False)
    coefficients = [c.detach().to(sample.device, torch.float64).reshape(-1).contiguous() for c in (c_x, c_e, sigma)]
    cond = None if model_output_cond is None else model_output_cond.contiguous()
    return DDIMStepFunction.apply(backend, sample.contiguous(), model_output.contiguous(), cond, noise.contiguous(),
                                  *coefficients, float(guidance_scale))
