"""NVTX ranges around the phases of an update, for Nsight Systems / Nsight Compute.

    from rlr_fast.profiling import enable_profiling, nvtx_range

    enable_profiling(True)             # or RLR_FAST_PROFILE=1 in the environment
    with nvtx_range("rollout"):
        ...
    @nvtx_range("reward")
    def reward(x): ...

Ranges are emitted only while profiling is enabled, through the `nvtx` package when it is
importable (it also works without a CUDA context) and otherwise through `torch.cuda.nvtx` when
CUDA is available. With profiling off, or with neither backend, entering a range reads one
module global and returns: cheap enough to leave around every step of a rollout.

The backend is resolved when profiling is switched on, not per range, so the hot path does no
imports or device queries. A range remembers which backend pushed it and pops from the same one,
so switching profiling off inside a range still leaves the NVTX stack balanced.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)


class NvtxBackend(NamedTuple):
    """How to push and pop one range; `name` says which library does it."""

    name: str
    push: Callable[[str], object]
    pop: Callable[[], object]


def _nvtx_package_backend() -> Optional[NvtxBackend]:
    try:
        import nvtx  # the NVIDIA `nvtx` package (pip install nvtx)
    except ImportError:
        return None
    return NvtxBackend("nvtx", lambda name: nvtx.push_range(message=name), nvtx.pop_range)


def _torch_backend() -> Optional[NvtxBackend]:
    # torch.cuda.nvtx raises on a CPU-only build or without a driver; only use it with CUDA.
    if not torch.cuda.is_available():
        return None
    return NvtxBackend("torch.cuda.nvtx", torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)


def find_backend() -> Optional[NvtxBackend]:
    """The NVTX backend this process would use: the nvtx package, else torch.cuda.nvtx, else None."""
    return _nvtx_package_backend() or _torch_backend()


# The backend ranges go to while profiling is on; None while it is off (or no backend exists).
_active: Optional[NvtxBackend] = None
_enabled = False


def enable_profiling(enabled: bool = True, backend: Optional[NvtxBackend] = None) -> Optional[NvtxBackend]:
    """Switch NVTX ranges on or off; returns the backend in use (None: ranges are no-ops).

    `backend` overrides the automatic choice (tests pass a recording fake).
    """
    global _active, _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enable_profiling takes True or False, got {enabled!r}")
    _enabled = enabled
    _active = (backend or find_backend()) if enabled else None
    return _active


def profiling_enabled() -> bool:
    """Whether profiling was switched on (by `enable_profiling` or RLR_FAST_PROFILE=1)."""
    return _enabled


class nvtx_range:
    """A named NVTX range: `with nvtx_range("name"): ...` or `@nvtx_range("name")`.

    As a decorator each call opens its own range, so recursive and concurrent calls nest correctly.
    """

    __slots__ = ("name", "_pushed_on")

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"an NVTX range needs a non-empty string name, got {name!r}")
        self.name = name
        self._pushed_on: Optional[NvtxBackend] = None

    def __enter__(self) -> "nvtx_range":
        backend = _active
        if backend is not None:
            backend.push(self.name)
            self._pushed_on = backend
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        backend, self._pushed_on = self._pushed_on, None
        if backend is not None:
            backend.pop()
        return False  # never swallow the body's exception

    def __call__(self, fn: F) -> F:
        name = self.name

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


if os.environ.get("RLR_FAST_PROFILE", "0") not in ("", "0"):
    enable_profiling(True)
