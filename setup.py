"""Build rlr_fast and its compiled extension `rlr_fast._C`.

C++ sources always; the CUDA sources join when the installed torch has CUDA and nvcc is found.
Build against the torch that is already installed:

    pip install -e . --no-build-isolation
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # build isolation hides the installed torch
    raise SystemExit(
        "rlr_fast builds against the installed torch: install torch first (README), then run "
        "`pip install -e . --no-build-isolation`"
    ) from e


def _want_cuda() -> bool:
    if os.environ.get("RLR_FAST_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    if _want_cuda():
        return CUDAExtension(
            "rlr_fast._C",
            cpp + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("RLR_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )
    return CppExtension("rlr_fast._C", cpp, extra_compile_args={"cxx": cxx + ["-fopenmp"]},
                        extra_link_args=["-fopenmp"])


setup(
    name="rlr_fast",
    version="0.1.0",
    description="Reward fine-tuning of diffusion models with the RLR (half-order) gradient estimator",
    # kernels/ sits at the top of the repo (Triton code, no rlr_fast imports) and installs as
    # rlr_fast.kernels so that it never claims a top-level name in site-packages.
    packages=find_packages(include=["rlr_fast", "rlr_fast.*"]) + ["rlr_fast.kernels"],
    package_dir={"rlr_fast.kernels": "kernels"},
    package_data={"rlr_fast": ["assets/**/*", "configs/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "diffusers>=0.30",
        "transformers>=4.44",
        "peft>=0.12",
        "safetensors",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={"triton": ["triton"], "nvtx": ["nvtx"], "test": ["pytest", "pytest-xdist"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["rlr-fast=rlr_fast.cli:main"]},
)
