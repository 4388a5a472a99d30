"""Measuring the bytes of a run on the meta device (or on real tensors, for tests).

* `LiveBytes`, a dispatch mode, sees every tensor an op creates and frees it when its storage dies;
  its running maximum is what `torch.cuda.max_memory_allocated` would report for those tensors
  (activations, saved tensors, gradients, temporaries; parameters and inputs made before the
  measurement are excluded). Allocator rounding, the CUDA context and cuDNN workspaces are not
  tensors and are not counted.
* `sweep.SavedTensorMemory` counts the bytes autograd keeps saved for backward, alive at once,
  deduplicated by storage.

Two things a meta run does differently from a GPU, and how `gpu_like_execution` puts them right:
* Attention: scaled_dot_product_attention on meta picks the MATH path, which saves the
  (batch, heads, tokens, tokens) softmax (~2.8 GiB for one SD1.4 step at batch 2 in fp16). A GPU
  runs flash / memory-efficient attention, which saves q, k, v, the output and a float32
  log-sum-exp per query. With attention="flash" every SDPA call is routed to
  `aten._scaled_dot_product_flash_attention_for_cpu`, whose autograd saves exactly that set, on
  meta. attention="math" keeps the MATH path (a GPU where SDPA cannot use a fused kernel).
* Mixed precision: meta tensors cannot enter CUDA autocast. With `autocast=True` the casts CUDA
  autocast makes for the ops these models use are emulated: linear / conv / matmul / attention in
  float16, group_norm / layer_norm / softmax in float32 (their outputs stay float32, as on a GPU).
  The emulation is on exactly while CPU autocast is enabled (it is entered for the measurement),
  so code that leaves autocast (`torch.autocast(..., enabled=False)`, as the VAE decode in
  `rewards.latent` does) leaves the emulation too, and a checkpointed recomputation restores it
  as torch.utils.checkpoint restores autocast. bfloat16 has the bytes of float16.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
ATTENTIONS = ("flash", "math")


@dataclass(frozen=True)
class Measurement:
    """Bytes of one measured run."""

    peak_bytes: int  # running maximum of live tensor bytes created inside the run
    saved_bytes: int  # peak bytes saved for backward by the outermost graph, alive at once (0 without grad)


class LiveBytes(TorchDispatchMode):
    """Running total and maximum of the bytes of tensor storages created while active.

    Storages of `existing` tensors (parameters, inputs; they must stay alive throughout) are never
    counted, nor are views of them. A storage is released when its last tensor dies (a weakref
    finalizer on the storage object, which PyTorch keeps alive exactly as long as the storage).
    """

    def __init__(self, existing: Sequence[torch.Tensor] = ()):
        super().__init__()
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self.created: set[int] = set()  # storage ids created inside and still alive
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.created or key in self._existing:
            return
        self.created.add(key)
        nbytes = storage.nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self.created.discard(key)
        self.current -= nbytes


# The torch.nn.functional entry points CUDA autocast casts to float16 / float32 (from torch's
# autocast op lists), restricted to those Stable Diffusion's UNet and VAE and CLIP call. Modules
# look these up on `F` at call time, so replacing the attributes reaches every call.
_AUTOCAST_HALF = ("linear", "conv2d", "scaled_dot_product_attention")
_AUTOCAST_FLOAT = ("group_norm", "layer_norm", "softmax", "log_softmax")


def _autocast_casts(fn: Callable, dtype: torch.dtype) -> Callable:
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    def call(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)
    return call


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
    if attn_mask is not None or extra:
        raise NotImplementedError("the planner models flash attention without a mask (Stable Diffusion passes "
                                  "none); measure with attention='math' for masked attention")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale)[0]


def _math_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)[0]


@contextlib.contextmanager
def gpu_like_execution(attention: str = "flash", autocast: bool = False) -> Iterator[None]:
    """Make a run save what the same run saves on a GPU (see the module docstring): SDPA as flash
    attention ("flash") or its MATH path ("math"), and, with `autocast`, CUDA autocast's casts.

    It replaces functions of torch.nn.functional for the duration (a mode would not reach the
    recomputation inside a checkpointed backward): not thread-safe, measurement only.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    replaced = {"scaled_dot_product_attention": _flash_attention if attention == "flash" else _math_attention}
    for name in _AUTOCAST_HALF:
        replaced[name] = _autocast_casts(replaced.get(name, getattr(F, name)), torch.float16)
    for name in _AUTOCAST_FLOAT:
        replaced[name] = _autocast_casts(getattr(F, name), torch.float32)
    original = {name: getattr(F, name) for name in replaced}
    try:
        for name, fn in replaced.items():
            setattr(F, name, fn)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            yield
    finally:
        for name, fn in original.items():
            setattr(F, name, fn)


def measure(run: Callable[[], Any], *, existing: Sequence[torch.Tensor] = (), attention: str = "flash",
            autocast: bool = False) -> Measurement:
    """Peak live bytes and saved-for-backward bytes of `run()`, excluding the storages of `existing`
    (parameters, buffers, inputs). Works on real tensors too (tests compare)."""
    from ..sweep import SavedTensorMemory

    live, saved = LiveBytes(existing), SavedTensorMemory(exclude=existing)
    with gpu_like_execution(attention, autocast), live, saved.track():
        run()
    return Measurement(peak_bytes=live.peak, saved_bytes=saved.peak)


def count_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations of `run()` (torch.utils.flop_counter; works on meta)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())
