"""What the Triton kernels share: the (block, sample) grid, the per-sample log-density reduction,
launch sizes, dtype rules and input checks.

Every kernel here runs on a grid of (blocks of BLOCK elements, samples): program (blk, b)
streams one block of sample b, and a reducing kernel writes one partial sum per program.
`finalize_log_density` then adds a sample's partials in a fixed order, so results are bitwise
reproducible (no atomics). ddim_step.py says why this grid.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import HALF_LOG_2PI, log_density_dtype

MAX_BLOCK = 1024  # elements per program: 8 per thread at 4 warps (one 16-byte vector in fp16)
NUM_WARPS = 4
FINALIZE_CHUNK = 256  # partials summed per loop iteration of the finalize kernel


@triton.jit
def add(a, b):
    # Sums use tl.reduce with this combine function rather than tl.sum (and tl.full rather than
    # tl.zeros): those are @triton.jit helpers of triton.language, which the interpreter (the CPU
    # tests) cannot call when triton was imported before TRITON_INTERPRET was set, as diffusers does.
    return a + b


@triton.jit
def sample_block(D, BLOCK: tl.constexpr):
    """(sample b, mask, flat indices) of this program's block of the (block, sample) grid."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return b, offs < D, b.to(tl.int64) * D + offs  # int64: B * D may pass 2^31 for large batches


@triton.jit
def store_partial(partial_ptr, values):
    """One program's partial sum of `values`, at (sample, block) of the (B, blocks) partials."""
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.reduce(values, 0, add))


@triton.jit
def _finalize_log_density_kernel(partial_ptr, sigma_ptr, out_ptr, num_partials, D,
                                 half_log_2pi_hi, half_log_2pi_lo,
                                 DIVIDE_BY_VARIANCE: tl.constexpr, ZERO_WITHOUT_NOISE: tl.constexpr,
                                 CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, COMPUTE: tl.constexpr):
    b = tl.program_id(0)
    acc = tl.full([CHUNK], 0.0, COMPUTE)
    # The trip count is a constexpr, not num_partials: Triton 3.6's interpreter turns a runtime bound into
    # a Python int with int() of a (1,)-shaped array, which numpy 2.5 refuses ("only 0-dimensional arrays
    # can be converted"). It is 1 up to FINALIZE_CHUNK partials (2^18 elements per sample; an SDXL latent
    # has 2^16), where CHUNK already specializes the kernel, so it adds no compilations there.
    for i in range(NUM_CHUNKS):  # fixed order: reproducible sums
        offs = i * CHUNK + tl.arange(0, CHUNK)
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


INTERPRETED = isinstance(_finalize_log_density_kernel, InterpretedFunction)


def compute_dtype(dtype: torch.dtype):
    """Arithmetic and reduction type: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def split_float(x: float) -> tuple[float, float]:
    """x as hi + lo, both exact in fp32: Triton passes Python floats as fp32 scalars, and the
    fp64 kernels rebuild x to ~48 bits as cast(hi) + cast(lo)."""
    hi = _round_to_fp32(x)
    return hi, _round_to_fp32(x - hi)


def _round_to_fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def launch_shape(t: torch.Tensor) -> tuple[int, int, tuple[int, int]]:
    """(elements per sample D, BLOCK, grid) of a (B, ...) tensor: blocks on grid axis 0 (limit
    2^31 - 1), samples on axis 1 (limit 65535)."""
    batch = t.shape[0]
    if batch > 65535:
        raise ValueError(f"batch of {batch} samples is above the 65535 a launch grid allows; split it")
    d = t.numel() // batch
    block = min(MAX_BLOCK, triton.next_power_of_2(d))
    return d, block, (triton.cdiv(d, block), batch)


def check_triton_device(name: str, t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter."""
    if t.device.type == "cpu" and not INTERPRETED:
        raise ValueError(f"{name} is on the CPU: the Triton kernels need CUDA tensors (or "
                         "TRITON_INTERPRET=1 set before triton kernels are defined); use the "
                         "'cpu' or 'reference' backend instead")


def per_sample(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A checked per-sample coefficient as a contiguous float64 (B,) tensor on `device`.

    float64 keeps the scheduler's values exact; kernels load one value per program and cast
    it to their compute type, so the width costs nothing.
    """
    return t.detach().to(device=device, dtype=torch.float64).reshape(-1).contiguous()


def finalize_log_density(partials: torch.Tensor, sigma: torch.Tensor, d: int, *, divide_by_variance: bool,
                         zero_without_noise: bool) -> torch.Tensor:
    """Per-sample log-density (B,), in the partials' dtype, from the (B, blocks) partial sums."""
    batch, num_partials = partials.shape
    out = torch.empty(batch, dtype=partials.dtype, device=partials.device)
    chunk = min(FINALIZE_CHUNK, triton.next_power_of_2(num_partials))
    _finalize_log_density_kernel[(batch,)](
        partials, sigma, out, num_partials, d, *split_float(HALF_LOG_2PI),
        DIVIDE_BY_VARIANCE=divide_by_variance, ZERO_WITHOUT_NOISE=zero_without_noise,
        CHUNK=chunk, NUM_CHUNKS=triton.cdiv(num_partials, chunk), COMPUTE=compute_dtype(partials.dtype))
    return out


def empty_partials(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, blocks) partial sums of a (B, ...) input, in its log-density dtype."""
    return torch.empty(grid[1], grid[0], dtype=log_density_dtype(t.dtype), device=t.device)
