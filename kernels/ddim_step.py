"""The fused DDIM step (with the classifier-free guidance combine) and its draw's log-density, in Triton.

Per sample b and element i (coefficients are per sample so one call can hold several timesteps):

    e      = u + w (c - u)          guidance (only when `model_output_cond` c is given)
    mean   = c_x[b] x + c_e[b] e
    prev   = mean + sigma[b] noise
    logp_b = -|noise_b|^2 / 2 - D log sigma[b] - D/2 log 2 pi       (0 where sigma[b] == 0)

logp does not depend on x or e: prev moves with the mean. Backward, with g = grad_prev + grad_mean:
grad_x = c_x g, grad_u = (1 - w) c_e g, grad_c = w c_e g (grad_u = c_e g without guidance),
grad_noise = sigma grad_prev - grad_logp noise (the logp term only where sigma > 0).
The same op as csrc/ddim_step.cpp; the specification is `reference.ddim_step_reference`.

Grid: programs over (block of BLOCK elements, sample), each writing one partial sum of noise^2;
a second one-program-per-sample kernel adds a sample's partials in a fixed order. For SD latents
(D = 4*64*64 = 16384) and B = 1..16 this gives 16*B programs of 1024 elements. The alternative,
one program per sample looping over its blocks, launches once but runs only B programs: at
B <= 16 more than 100 of an H100's 132 SMs would idle, and a single SM streaming a 320 KB sample
(five tensors) cannot pull the bandwidth the whole chip can. The op moves at most 5 MB, so it is
launch-latency bound either way; one extra tiny launch is the cheaper price than 16x fewer
programs, and fixed-order partials keep the result reproducible without atomics.
(Reasoned, not yet measured on a GPU.)

Layers, Liger-Kernel style: the kernels, their launchers and the functional `ddim_step` here; the
autograd Function, one for every backend of the op (rlr_fast._C's too), in ddim_step_function.py;
the grid helpers and the reduction's second kernel in utils.py; the specification in reference.py.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from .ddim_step_function import fused_ddim_step
from .utils import (NUM_WARPS, check_triton_device, compute_dtype, empty_partials, finalize_log_density,
                    launch_shape, sample_block, split_float, store_partial)

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _ddim_step_forward_kernel(x_ptr, u_ptr, c_ptr, noise_ptr, cx_ptr, ce_ptr, sigma_ptr,
                              prev_ptr, mean_ptr, partial_ptr, w_hi, w_lo, D,
                              HAS_COND: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    b, mask, idx = sample_block(D, BLOCK)
    cx = tl.load(cx_ptr + b).to(COMPUTE)
    ce = tl.load(ce_ptr + b).to(COMPUTE)
    sigma = tl.load(sigma_ptr + b).to(COMPUTE)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    e = tl.load(u_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    if HAS_COND:
        w = tl.cast(w_hi, COMPUTE) + tl.cast(w_lo, COMPUTE)
        e = e + w * (tl.load(c_ptr + idx, mask=mask, other=0.0).to(COMPUTE) - e)
    noise = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    mean = cx * x + ce * e
    tl.store(mean_ptr + idx, mean.to(mean_ptr.dtype.element_ty), mask=mask)
    tl.store(prev_ptr + idx, (mean + sigma * noise).to(prev_ptr.dtype.element_ty), mask=mask)
    store_partial(partial_ptr, noise * noise)


@triton.jit
def _ddim_step_backward_kernel(grad_prev_ptr, grad_mean_ptr, grad_logp_ptr, noise_ptr, cx_ptr, ce_ptr, sigma_ptr,
                               grad_x_ptr, grad_u_ptr, grad_c_ptr, grad_noise_ptr, w_hi, w_lo, D,
                               HAS_GRAD_PREV: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr,
                               HAS_GRAD_LOGP: tl.constexpr, HAS_COND: tl.constexpr,
                               NEED_X: tl.constexpr, NEED_U: tl.constexpr, NEED_C: tl.constexpr,
                               NEED_NOISE: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    # Cotangents autograd did not provide and gradients nobody asked for are compile-time
    # absent: recompute_steps, the hot caller, reads only grad_mean and writes only grad_u/grad_c.
    b, mask, idx = sample_block(D, BLOCK)
    g = tl.full([BLOCK], 0.0, COMPUTE)
    if HAS_GRAD_PREV:
        grad_prev = tl.load(grad_prev_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
        g += grad_prev
    if HAS_GRAD_MEAN:
        g += tl.load(grad_mean_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    if NEED_X:
        cx = tl.load(cx_ptr + b).to(COMPUTE)
        tl.store(grad_x_ptr + idx, (cx * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
    ge = tl.load(ce_ptr + b).to(COMPUTE) * g
    if HAS_COND:
        w = tl.cast(w_hi, COMPUTE) + tl.cast(w_lo, COMPUTE)
        if NEED_U:
            tl.store(grad_u_ptr + idx, ((1.0 - w) * ge).to(grad_u_ptr.dtype.element_ty), mask=mask)
        if NEED_C:
            tl.store(grad_c_ptr + idx, (w * ge).to(grad_c_ptr.dtype.element_ty), mask=mask)
    elif NEED_U:
        tl.store(grad_u_ptr + idx, ge.to(grad_u_ptr.dtype.element_ty), mask=mask)
    if NEED_NOISE:
        sigma = tl.load(sigma_ptr + b).to(COMPUTE)
        grad_noise = tl.full([BLOCK], 0.0, COMPUTE)
        if HAS_GRAD_PREV:
            grad_noise += sigma * grad_prev
        if HAS_GRAD_LOGP:  # d logp / d noise = -noise, where there is a density
            grad_logp = tl.where(sigma > 0, tl.load(grad_logp_ptr + b).to(COMPUTE), 0.0)
            grad_noise -= grad_logp * tl.load(noise_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
        tl.store(grad_noise_ptr + idx, grad_noise.to(grad_noise_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (this module is a backend of ddim_step_function.DDIMStepFunction): inputs already
# checked, contiguous, coefficients float64 (B,) on the tensors' device


def ddim_step_forward(sample, model_output, model_output_cond, noise, c_x, c_e, sigma, guidance_scale: float):
    """(prev, mean, log_prob) of the fused step."""
    check_triton_device("sample", sample)
    d, block, grid = launch_shape(sample)
    prev, mean = torch.empty_like(sample), torch.empty_like(sample)
    partials = empty_partials(sample, grid)
    has_cond = model_output_cond is not None
    _ddim_step_forward_kernel[grid](
        sample, model_output, model_output_cond if has_cond else model_output, noise, c_x, c_e, sigma,
        prev, mean, partials, *split_float(guidance_scale), d,
        HAS_COND=has_cond, BLOCK=block, COMPUTE=compute_dtype(sample.dtype), num_warps=NUM_WARPS)
    log_prob = finalize_log_density(partials, sigma, d, divide_by_variance=False, zero_without_noise=True)
    return prev, mean, log_prob


def ddim_step_backward(grad_prev: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor],
                       grad_logp: Optional[torch.Tensor], noise, c_x, c_e, sigma, guidance_scale: float,
                       has_cond: bool, need: tuple[bool, bool, bool, bool]):
    """(grad_sample, grad_model_output, grad_model_output_cond, grad_noise); None where not in `need`.

    Missing cotangents (None) count as zero without being materialised.
    """
    need_x, need_u, need_c, need_noise = need
    need_c = need_c and has_cond
    d, block, grid = launch_shape(noise)
    outs = [torch.empty_like(noise) if n else None for n in (need_x, need_u, need_c, need_noise)]
    # Absent pointers get any live tensor: the kernel never touches them (constexpr flags).
    stand_in = noise
    _ddim_step_backward_kernel[grid](
        stand_in if grad_prev is None else grad_prev.contiguous(),
        stand_in if grad_mean is None else grad_mean.contiguous(),
        stand_in if grad_logp is None else grad_logp.contiguous(),
        noise, c_x, c_e, sigma, *(stand_in if o is None else o for o in outs),
        *split_float(guidance_scale), d,
        HAS_GRAD_PREV=grad_prev is not None, HAS_GRAD_MEAN=grad_mean is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_COND=has_cond, NEED_X=need_x, NEED_U=need_u,
        NEED_C=need_c, NEED_NOISE=need_noise, BLOCK=block, COMPUTE=compute_dtype(noise.dtype),
        num_warps=NUM_WARPS)
    return tuple(outs)


# ----------------------------------------------------------------------------------------------
# The functional API (the autograd Function, shared with the compiled backend, is ddim_step_function.py)


def ddim_step(sample: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor, c_x: torch.Tensor,
              c_e: torch.Tensor, sigma: torch.Tensor, *, model_output_cond: Optional[torch.Tensor] = None,
              guidance_scale: float = 1.0):
    """One fused DDIM step and the log-density of its draw, by the Triton kernels: (prev_sample, mean,
    log_prob). Arguments, results and gradients as `ddim_step_function.fused_ddim_step`; arithmetic and
    the reduction run in fp32 (fp64 for fp64 inputs); the backward computes only the gradients autograd
    asks for.
    """
    return fused_ddim_step(sys.modules[__name__], sample, model_output, noise, c_x, c_e, sigma,
                           model_output_cond=model_output_cond, guidance_scale=guidance_scale)
