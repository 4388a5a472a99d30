"""rlr_fast: reward fine-tuning of diffusion models with the RLR (half-order) gradient estimator."""

import logging as _logging

import torch as _torch  # loads libc10/libtorch, which _C links against

from . import compiled as _compiled

if not _compiled.available():  # one line: the fallback is complete, only slower
    _logging.getLogger(__name__).warning("rlr_fast: compiled kernels unavailable, using Triton (CUDA) or the "
                                         "PyTorch reference (CPU): %s", _compiled.MISSING)

from .baselines import ValueStatistics
from .ddim import ddim_step, gaussian_log_prob, gaussian_log_prob_reference
from .design import design  # binds the function over the subpackage's name, as plan does
from .estimators import estimate
from .plan import plan  # binds the function over the submodule's name: rlr_fast.plan(config)
from .rollout import Trajectory, recompute_step, rollout
from .samplers import DDIMSampler, Sampler, StepSchedule, step_coefficients

__version__ = "0.1.0"

# Submodules that import diffusers/transformers load on first use, so `import rlr_fast` stays fast.
_LAZY = ("models", "rewards", "train", "run_setup", "config", "profiling", "cuda_graph", "default_model",
         "demo_data", "cli", "checkpoint", "inference", "metrics", "run_dir", "update", "prompts", "evaluation",
         "eval_report", "lora")


_LAZY_NAMES = {"finetune": "train", "Result": "train", "Config": "config"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'rlr_fast' has no attribute {name!r}")


def build_info() -> dict:
    """What was compiled into rlr_fast._C and what it runs with; `compiled_missing` says why _C is absent."""
    from .ddim import triton_available, resolve_backend

    return {
        "version": __version__,
        "torch": _torch.__version__,
        "compiled": _compiled.available(),
        "compiled_missing": _compiled.MISSING,
        "built_against_torch": _compiled.built_against_torch(),
        "cuda_kernels": _compiled.has_cuda(),
        "triton": triton_available(),
        "cuda_available": _torch.cuda.is_available(),
        "backend_cpu": resolve_backend(_torch.device("cpu")),
        "backend_cuda": resolve_backend(_torch.device("cuda")),
    }
