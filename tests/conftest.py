"""Shared fixtures: small models built offline so every test runs on 2 CPU cores."""

import os

import torch

# Triton kernels run under the interpreter on CPU; the variable must be set before anything
# (diffusers included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rlr_fast.testing import make_scheduler, make_unet  # noqa: E402

# The suite runs as 2 xdist workers on 2 cores; more threads per worker only spin and wait.
torch.set_num_threads(1)


def pytest_sessionstart(session):
    """RLR_FAST_REQUIRE_GPU=1 (bench/gpu_check.sh): stop at once, rather than skip the GPU tests,
    where there is no GPU, rlr_fast._C lacks its CUDA kernels or Triton would run interpreted."""
    if os.environ.get("RLR_FAST_REQUIRE_GPU") != "1":
        return
    from rlr_fast import _C

    lacking = [what for what, present in (
        ("a CUDA device", torch.cuda.is_available()),
        ("rlr_fast._C built with its CUDA kernels", _C.has_cuda()),
        ("compiled Triton (TRITON_INTERPRET is set)", os.environ.get("TRITON_INTERPRET", "0") in ("", "0")),
    ) if not present]
    if lacking:
        raise pytest.UsageError("RLR_FAST_REQUIRE_GPU=1, but this run lacks " + ", ".join(lacking))


@pytest.fixture(scope="session")
def unet():
    return make_unet()


@pytest.fixture
def scheduler():
    return make_scheduler()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny SD1.4-shaped pipeline saved as a diffusers folder."""
    from rlr_fast.models import tiny_sd

    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd(seed=0).save_pretrained(path)
    return path
