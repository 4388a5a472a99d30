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
    where there is no GPU or Triton would run interpreted. A rlr_fast._C without its CUDA kernels (a
    failed build) fails test_compiled.py's CUDA cases instead, so that the Triton checks still run."""
    if os.environ.get("RLR_FAST_REQUIRE_GPU") != "1":
        return
    lacking = [what for what, present in (
        ("a CUDA device", torch.cuda.is_available()),
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


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """finetune overrides for a run of a few seconds on the tiny SD: T = 3, one prompt x 2 images per step."""
    return dict(model=str(tiny_folder), num_steps=3, batch_size=2, images_per_prompt=2, sample_prompts=1,
                sample_seeds=(0,), tensorboard=False, warmup_steps=1, lr=1e-2)


def _corrupt_tensor(path, name: str, how: str = "exponent") -> None:
    """Damage tensor `name` of a safetensors file in place, leaving its header intact: flip the top
    exponent bit of its first (little-endian float32) element, or overwrite all its bytes with random ones."""
    import json

    import numpy as np

    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[name]["data_offsets"]
    start, end = start + 8 + header_len, end + 8 + header_len
    if how == "exponent":
        data[start + 3] ^= 0x40
    else:
        data[start:end] = np.random.default_rng(0).bytes(end - start)
    path.write_bytes(bytes(data))


@pytest.fixture
def corrupt_tensor():
    """`corrupt_tensor(path, name, how="exponent" | "random")`: damage one tensor of a safetensors file."""
    return _corrupt_tensor


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create entries in: one without write permission, or for root
    (whom permissions do not bind) /sys, which refuses every new entry."""
    from pathlib import Path

    if os.geteuid() == 0:
        return Path("/sys")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked
