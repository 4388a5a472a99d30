"""NVTX ranges: no-ops when off, balanced push/pop in order when on (even when the body raises)."""

import os
import subprocess
import sys

import pytest

from rlr_fast import profiling
from rlr_fast.profiling import NvtxBackend, enable_profiling, nvtx_range


@pytest.fixture
def recorder():
    """A fake NVTX backend that records pushes and pops; profiling is switched off afterwards."""
    events = []
    backend = NvtxBackend("fake", lambda name: events.append(("push", name)), lambda: events.append(("pop",)))
    yield backend, events
    enable_profiling(False)


def test_off_is_a_no_op_and_nesting_works():
    enable_profiling(False)
    calls = []

    @nvtx_range("outer fn")
    def fn(x):
        with nvtx_range("inner"):
            calls.append(x)
        return x + 1

    with nvtx_range("a"), nvtx_range("b"):
        assert fn(1) == 2
    assert calls == [1]
    assert not profiling.profiling_enabled()


def test_on_cpu_without_nvtx_package_ranges_are_inert():
    if profiling.find_backend() is not None:
        pytest.skip("an NVTX backend exists here (nvtx package or CUDA)")
    assert enable_profiling(True) is None
    try:
        with nvtx_range("rollout"):
            pass
    finally:
        enable_profiling(False)


def test_ranges_push_and_pop_in_order(recorder):
    backend, events = recorder
    assert enable_profiling(True, backend=backend) is backend

    @nvtx_range("step")
    def step(k):
        with nvtx_range(f"unet {k}"):
            return k

    with nvtx_range("rollout"):
        for k in range(2):
            step(k)
    assert events == [("push", "rollout"),
                      ("push", "step"), ("push", "unet 0"), ("pop",), ("pop",),
                      ("push", "step"), ("push", "unet 1"), ("pop",), ("pop",),
                      ("pop",)]


def test_balanced_when_the_body_raises(recorder):
    backend, events = recorder
    enable_profiling(True, backend=backend)

    @nvtx_range("fails")
    def fails():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        with nvtx_range("outer"):
            fails()
    assert events == [("push", "outer"), ("push", "fails"), ("pop",), ("pop",)]


def test_recursive_decorated_calls_nest(recorder):
    backend, events = recorder
    enable_profiling(True, backend=backend)

    @nvtx_range("rec")
    def rec(n):
        return 0 if n == 0 else 1 + rec(n - 1)

    assert rec(2) == 2
    assert [e[0] for e in events] == ["push"] * 3 + ["pop"] * 3


def test_switching_off_inside_a_range_still_pops(recorder):
    backend, events = recorder
    enable_profiling(True, backend=backend)
    with nvtx_range("open"):
        enable_profiling(False)
        with nvtx_range("not recorded"):
            pass
    assert events == [("push", "open"), ("pop",)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="non-empty string"):
        nvtx_range("")
    with pytest.raises(TypeError, match="True or False"):
        enable_profiling("yes")


@pytest.mark.slow
def test_environment_variable_enables_profiling():
    code = "from rlr_fast import profiling; print(profiling.profiling_enabled())"
    env = dict(os.environ, RLR_FAST_PROFILE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
