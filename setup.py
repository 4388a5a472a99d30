"""Build rlr_fast and its compiled extension `rlr_fast._C`.

C++ sources always; the CUDA sources join when the installed torch has CUDA and nvcc is found.
Build against the torch that is already installed:

    pip install -e . --no-build-isolation
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

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


class BuildPyWithKernels(build_py):
    """Installs the kernel sources, top-level kernels/, as the modules of rlr_fast.kernels.

    kernels/ is no package (from the repository root it would shadow the `kernels` distribution);
    rlr_fast/kernels/__init__.py is the package, and an editable install reaches kernels/ through it.
    """

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = os.path.join(self.build_lib, "rlr_fast", "kernels")
        for source in sorted(glob.glob("kernels/*.py")):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


# Name, version and the supported dependency ranges are in pyproject.toml; here what needs code.
setup(
    packages=find_packages(include=["rlr_fast", "rlr_fast.*"]),
    package_data={"rlr_fast": ["assets/**/*", "configs/*.yaml"]},
    include_package_data=True,
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernels},
)
