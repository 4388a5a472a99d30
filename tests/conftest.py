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
