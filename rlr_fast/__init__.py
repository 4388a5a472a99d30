"""rlr_fast: reward fine-tuning of diffusion models with the RLR (half-order) gradient estimator."""

import torch as _torch  # loads libc10/libtorch, which _C links against

try:
    from . import _C
except ImportError as e:  # the package is importable from a source tree without its extension
    raise ImportError(
        "rlr_fast._C, the compiled extension, is missing or was built against another torch. "
        "Build it from the repository root with `pip install -e . --no-build-isolation` "
        f"(after installing torch; see README). Original error: {e}"
    ) from e

from .baselines import ValueStatistics
from .ddim import ddim_step, gaussian_log_prob, gaussian_log_prob_reference
from .design import design  # binds the function over the subpackage's name, as plan does
from .estimators import estimate
from .plan import plan  # binds the function over the submodule's name: rlr_fast.plan(config)
from .rollout import Trajectory, recompute_step, rollout
from .samplers import DDIMSampler, Sampler, StepSchedule, step_coefficients

__version__ = "0.1.0"

# Submodules that import diffusers/transformers load on first use, so `import rlr_fast` stays fast.
_LAZY = ("models", "rewards", "train", "config", "profiling", "cuda_graph", "default_model",
         "demo_data", "cli", "checkpoint", "inference", "metrics", "run_dir", "update", "prompts", "evaluation", "eval_report", "lora")


_LAZY_NAMES = {"finetune": "train", "Result": "train", "Config": "config"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'rlr_fast' has no attribute {name!r}")


def build_info() -> dict:
    """What was compiled into rlr_fast._C and what it runs with."""
    from .ddim import _triton_available, resolve_backend

    return {
        "version": __version__,
        "torch": _torch.__version__,
        "built_against_torch": _C.torch_version,
        "cuda_kernels": bool(_C.has_cuda()),
        "triton": _triton_available(),
        "cuda_available": _torch.cuda.is_available(),
        "backend_cpu": resolve_backend(_torch.device("cpu")),
        "backend_cuda": resolve_backend(_torch.device("cuda")),
    }
