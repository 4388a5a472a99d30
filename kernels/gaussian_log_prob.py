"""Gaussian log-density with an isotropic per-sample scale, and its score, in Triton.

    logp_b = log N(sample_b; mean_b, sigma_b^2 I)
           = -|sample_b - mean_b|^2 / (2 sigma_b^2) - D log sigma_b - D/2 log 2 pi

summed over the D elements of each sample (not averaged). Backward, for the cotangent g_b:

    d/dmean   =  g_b (sample - mean) / sigma^2      (the score of the mean)
    d/dsample = -d/dmean

It is the DDPO importance ratio's numerator. sigma must be > 0: a zero sigma gives inf/nan as
the reference does (checking it here would force a device sync on every call).

Layers, Liger-Kernel style: the @triton.jit kernels, the launchers (grid, block size,
contiguity, dtypes), `GaussianLogProbFunction` (autograd), the functional `gaussian_log_prob`,
and `gaussian_log_prob_reference`, the plain PyTorch specification the tests compare against.

The per-sample reduction is shared with `ddim_step.py` (its log-density is this one with the
noise as `sample - mean` already divided by sigma): each program of a (block, sample) grid
writes one partial sum, and `finalize_log_density` adds a sample's partials in a fixed order,
so results are bitwise reproducible (no atomics). See `ddim_step.py` for why this grid.
"""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
MAX_BLOCK = 1024  # elements per program: 8 per thread at 4 warps (one 16-byte vector in fp16)
NUM_WARPS = 4
FINALIZE_CHUNK = 256  # partials summed per loop iteration of the finalize kernel
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def add(a, b):
    # Sums use tl.reduce with this combine function rather than tl.sum (and tl.full rather than
    # tl.zeros): those are @triton.jit helpers of triton.language, which the interpreter (the CPU
    # tests) cannot call when triton was imported before TRITON_INTERPRET was set, as diffusers does.
    return a + b


@triton.jit
def _squared_distance_partials_kernel(sample_ptr, mean_ptr, partial_ptr, D,
                                      BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = b.to(tl.int64) * D + offs  # B * D may pass 2^31 for large batches
    x = tl.load(sample_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    m = tl.load(mean_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    diff = x - m
    tl.store(partial_ptr + b * tl.num_programs(0) + blk, tl.reduce(diff * diff, 0, add))


@triton.jit
def _finalize_log_density_kernel(partial_ptr, sigma_ptr, out_ptr, num_partials, D,
                                 half_log_2pi_hi, half_log_2pi_lo,
                                 DIVIDE_BY_VARIANCE: tl.constexpr, ZERO_WITHOUT_NOISE: tl.constexpr,
                                 CHUNK: tl.constexpr, COMPUTE: tl.constexpr):
    b = tl.program_id(0)
    acc = tl.full([CHUNK], 0.0, COMPUTE)
    for start in range(0, num_partials, CHUNK):  # fixed order: reproducible sums
        offs = start + tl.arange(0, CHUNK)
        acc += tl.load(partial_ptr + b * num_partials + offs, mask=offs < num_partials, other=0.0)
    sq = tl.reduce(acc, 0, add)
    sigma = tl.load(sigma_ptr + b).to(COMPUTE)
    if DIVIDE_BY_VARIANCE:
        sq = sq / (sigma * sigma)
    half_log_2pi = tl.cast(half_log_2pi_hi, COMPUTE) + tl.cast(half_log_2pi_lo, COMPUTE)
    logp = -0.5 * sq - D * (tl.log(sigma) + half_log_2pi)
    if ZERO_WITHOUT_NOISE:  # a deterministic step (sigma == 0) has no density: report 0
        logp = tl.where(sigma > 0, logp, 0.0)
    tl.store(out_ptr + b, logp.to(out_ptr.dtype.element_ty))


@triton.jit
def _score_backward_kernel(sample_ptr, mean_ptr, sigma_ptr, grad_ptr, grad_sample_ptr, grad_mean_ptr, D,
                           NEED_SAMPLE: tl.constexpr, NEED_MEAN: tl.constexpr,
                           BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = b.to(tl.int64) * D + offs
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
# Launch helpers shared with ddim_step.py

_INTERPRETED = isinstance(_squared_distance_partials_kernel, InterpretedFunction)


def compute_dtype(dtype: torch.dtype):
    """Arithmetic and reduction type: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_float(x: float) -> tuple[float, float]:
    """x as hi + lo, both exact in fp32: Triton passes Python floats as fp32 scalars, and the
    fp64 kernels rebuild x to ~48 bits as cast(hi) + cast(lo)."""
    hi = _round_to_fp32(x)
    return hi, _round_to_fp32(x - hi)


def _round_to_fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def block_size(d: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(d))


def grid_2d(batch: int, d: int, block: int) -> tuple[int, int]:
    """(blocks per sample, samples): blocks on axis 0, whose limit is 2^31 - 1, samples on axis 1."""
    if batch > 65535:
        raise ValueError(f"batch of {batch} samples is above the 65535 a launch grid allows; split it")
    return triton.cdiv(d, block), batch


def check_tensor(name: str, t, like: Optional[torch.Tensor] = None) -> None:
    """Raise TypeError / ValueError naming `name` for what the kernels cannot take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if like is None:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take {SUPPORTED_DTYPES}")
        if t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty tensor with a batch dimension, got shape "
                             f"{tuple(t.shape)}")
        if t.device.type == "cpu" and not _INTERPRETED:
            raise ValueError(f"{name} is on the CPU: the Triton kernels need CUDA tensors (or "
                             "TRITON_INTERPRET=1 set before triton kernels are defined); use the "
                             "'cpu' or 'reference' backend instead")
        return
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype} like the sample")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device} like the sample")


def per_sample(name: str, t, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sample coefficient as a contiguous float64 (batch,) tensor on `device`.

    float64 keeps the scheduler's values exact; kernels load one value per program and cast
    it to their compute type, so the width costs nothing.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({batch},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.numel() != batch:
        raise ValueError(f"{name} must hold one value per sample ({batch}), got shape {tuple(t.shape)}")
    if t.requires_grad:
        raise ValueError(f"{name} requires grad, but the kernels do not differentiate it; pass "
                         f"{name}.detach() or use the reference backend")
    return t.detach().to(device=device, dtype=torch.float64).reshape(batch).contiguous()


def finalize_log_density(partials: torch.Tensor, sigma: torch.Tensor, d: int, out_dtype: torch.dtype, *,
                         divide_by_variance: bool, zero_without_noise: bool) -> torch.Tensor:
    """Per-sample log-density (B,) from the (B, blocks) partial sums of squares."""
    batch, num_partials = partials.shape
    out = torch.empty(batch, dtype=out_dtype, device=partials.device)
    _finalize_log_density_kernel[(batch,)](
        partials, sigma, out, num_partials, d, *split_float(HALF_LOG_2PI),
        DIVIDE_BY_VARIANCE=divide_by_variance, ZERO_WITHOUT_NOISE=zero_without_noise,
        CHUNK=min(FINALIZE_CHUNK, triton.next_power_of_2(num_partials)),
        COMPUTE=tl.float64 if partials.dtype == torch.float64 else tl.float32)
    return out


# ----------------------------------------------------------------------------------------------
# Launchers


def gaussian_log_prob_forward(sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(B,) log-density; `sample`, `mean` contiguous, `sigma` float64 (B,) on their device."""
    batch = sample.shape[0]
    d = sample.numel() // batch
    block = block_size(d)
    grid = grid_2d(batch, d, block)
    partials = torch.empty(batch, grid[0], dtype=partial_dtype(sample.dtype), device=sample.device)
    _squared_distance_partials_kernel[grid](sample, mean, partials, d, BLOCK=block,
                                            COMPUTE=compute_dtype(sample.dtype), num_warps=NUM_WARPS)
    return finalize_log_density(partials, sigma, d, partial_dtype(sample.dtype), divide_by_variance=True,
                                zero_without_noise=False)


def gaussian_log_prob_backward(grad: torch.Tensor, sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor,
                               need_sample: bool, need_mean: bool):
    """(grad_sample, grad_mean), each None where not needed."""
    batch = sample.shape[0]
    d = sample.numel() // batch
    block = block_size(d)
    grad_sample = torch.empty_like(sample) if need_sample else None
    grad_mean = torch.empty_like(sample) if need_mean else None
    _score_backward_kernel[grid_2d(batch, d, block)](
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
    """log N(sample; mean, sigma^2 I) summed over each sample's elements; (B,) in sample's dtype.

    sample, mean (B, ...): same shape, dtype (fp16, bf16, fp32, fp64) and device. sigma (B,):
    per-sample standard deviation, > 0, any float dtype and device, not differentiated.
    Differentiable in sample and mean. Sums and arithmetic run in fp32 (fp64 for fp64 inputs).
    """
    check_tensor("sample", sample)
    check_tensor("mean", mean, like=sample)
    sigma = per_sample("sigma", sigma, sample.shape[0], sample.device)
    return GaussianLogProbFunction.apply(sample.contiguous(), mean.contiguous(), sigma)


def gaussian_log_prob_reference(sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The specification in plain PyTorch (autograd gives the backward)."""
    d, dtype = sample[0].numel(), partial_dtype(sample.dtype)
    s = sigma.to(dtype).reshape((-1,) + (1,) * (sample.dim() - 1))
    z = ((sample - mean).to(dtype) / s).flatten(1)
    return -0.5 * z.pow(2).sum(1) - d * (sigma.to(dtype).log() + HALF_LOG_2PI)
