"""Gaussian log-density with an isotropic per-sample scale, and its score, in Triton.

    logp_b = log N(sample_b; mean_b, sigma_b^2 I)
           = -|sample_b - mean_b|^2 / (2 sigma_b^2) - D log sigma_b - D/2 log 2 pi

summed over the D elements of each sample (not averaged). Backward, for the cotangent g_b:

    d/dmean   =  g_b (sample - mean) / sigma^2      (the score of the mean)
    d/dsample = -d/dmean

It is the DDPO importance ratio's numerator. sigma must be > 0: a zero sigma gives inf/nan as
the reference does (checking it here would force a device sync on every call).

Layers, Liger-Kernel style: the @triton.jit kernels, the launchers, `GaussianLogProbFunction`
(autograd), the functional `gaussian_log_prob`; the specification is
`reference.gaussian_log_prob_reference`. The (block, sample) grid and its fixed-order
reduction are shared with ddim_step.py through utils.py (its log-density is this one with the
noise as `sample - mean` already divided by sigma).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_log_prob_inputs
from .utils import (NUM_WARPS, check_triton_device, compute_dtype, empty_partials, finalize_log_density,
                    launch_shape, per_sample, sample_block, store_partial)

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _squared_distance_partials_kernel(sample_ptr, mean_ptr, partial_ptr, D,
                                      BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    b, mask, idx = sample_block(D, BLOCK)
    x = tl.load(sample_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    m = tl.load(mean_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    diff = x - m
    store_partial(partial_ptr, diff * diff)


@triton.jit
def _score_backward_kernel(sample_ptr, mean_ptr, sigma_ptr, grad_ptr, grad_sample_ptr, grad_mean_ptr, D,
                           NEED_SAMPLE: tl.constexpr, NEED_MEAN: tl.constexpr,
                           BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    b, mask, idx = sample_block(D, BLOCK)
    sigma = tl.load(sigma_ptr + b).to(COMPUTE)
    scale = tl.load(grad_ptr + b).to(COMPUTE) / (sigma * sigma)
    x = tl.load(sample_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    m = tl.load(mean_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    score = scale * (x - m)
    if NEED_MEAN:
        tl.store(grad_mean_ptr + idx, score.to(grad_mean_ptr.dtype.element_ty), mask=mask)
    if NEED_SAMPLE:
        tl.store(grad_sample_ptr + idx, (-score).to(grad_sample_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: inputs already checked, contiguous, sigma float64 (B,) on the tensors' device


def gaussian_log_prob_forward(sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(B,) log-density in fp32 (fp64 for fp64 inputs)."""
    d, block, grid = launch_shape(sample)
    partials = empty_partials(sample, grid)
    _squared_distance_partials_kernel[grid](sample, mean, partials, d, BLOCK=block,
                                            COMPUTE=compute_dtype(sample.dtype), num_warps=NUM_WARPS)
    return finalize_log_density(partials, sigma, d, divide_by_variance=True, zero_without_noise=False)


def gaussian_log_prob_backward(grad: torch.Tensor, sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor,
                               need_sample: bool, need_mean: bool):
    """(grad_sample, grad_mean), each None where not needed."""
    d, block, grid = launch_shape(sample)
    grad_sample = torch.empty_like(sample) if need_sample else None
    grad_mean = torch.empty_like(sample) if need_mean else None
    _score_backward_kernel[grid](
        sample, mean, sigma, grad.contiguous(), grad_sample, grad_mean, d,
        NEED_SAMPLE=need_sample, NEED_MEAN=need_mean, BLOCK=block, COMPUTE=compute_dtype(sample.dtype),
        num_warps=NUM_WARPS)
    return grad_sample, grad_mean


# ----------------------------------------------------------------------------------------------
# Autograd and the functional API


class GaussianLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sample, mean, sigma):
        ctx.save_for_backward(sample, mean, sigma)
        return gaussian_log_prob_forward(sample, mean, sigma)

    @staticmethod
    def backward(ctx, grad):
        sample, mean, sigma = ctx.saved_tensors
        need_sample, need_mean = ctx.needs_input_grad[:2]
        if not (need_sample or need_mean):
            return None, None, None
        grad_sample, grad_mean = gaussian_log_prob_backward(grad, sample, mean, sigma, need_sample, need_mean)
        return grad_sample, grad_mean, None


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, sigma^2 I) summed over each sample's elements: (B,) in fp32 (fp64 for
    fp64 inputs), as `reference.gaussian_log_prob_reference`.

    sample, mean (B, ...): same shape, dtype (fp16, bf16, fp32, fp64) and device. sigma (B,):
    per-sample standard deviation, > 0, any float dtype and device, not differentiated.
    Differentiable in sample and mean. Sums and arithmetic run in fp32 (fp64 for fp64 inputs).
    """
    check_log_prob_inputs(sample, mean, sigma, differentiable_sigma=False)
    check_triton_device("sample", sample)
    sigma = per_sample(sigma, sample.device)
    return GaussianLogProbFunction.apply(sample.contiguous(), mean.contiguous(), sigma)
