"""Packaging (issue 19): no top-level name of the repository shadows another distribution when the
root is on sys.path (`python -m`, torchrun and pytest put it there), and rlr_fast imports without its
compiled extension, saying why in one warning line and in build_info()."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What transformers imports from the `kernels` distribution (5.x, integrations/hub_kernels.py) when
# it is installed: CUDAProperties by name, the rest through the module's __getattr__.
STAND_IN = '''"""A stand-in for the `kernels` distribution, with its own CUDAProperties."""


class CUDAProperties:
    def __init__(self, *args, **kwargs):
        pass


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) else _Anything()

    def __getattr__(self, name):
        return _Anything()



def __getattr__(name):
    return _Anything()
'''


@pytest.fixture(scope="module")
def stand_in_site(tmp_path_factory):
    """Where an installed `kernels` distribution sits: nowhere extra when a real one is installed
    (transformers 5.25 brings it: scripts/compat.sh), else a site directory holding the stand-in (package
    and metadata) at the lowest version the installed transformers accepts (0.18.2 for 5.24)."""
    import importlib.metadata

    from transformers.utils import import_utils

    if list(importlib.metadata.distributions(name="kernels")):
        return None
    version = getattr(import_utils, "KERNELS_MIN_VERSION", "0.19.1")
    site = tmp_path_factory.mktemp("site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text(STAND_IN)
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    return site


def run_from_root(args, site=None, timeout=600, **env):
    """`args` with the repository root as the working directory (first on sys.path for -m and -c), and
    `site` after it on PYTHONPATH, where an installed distribution sits."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_the_repository_root_holds_no_package_but_rlr_fast():
    """Every other top-level directory is no regular package (kernels/, bench/, tests/, ...), so an
    installed distribution of the same name wins over it; setup.py is the only top-level module."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert packages == ["rlr_fast"]
    assert modules == ["setup.py"]


def test_kernels_from_the_root_is_the_installed_distribution(stand_in_site):
    code = ("import kernels, transformers.integrations.hub_kernels as hub; "
            "print(kernels.__file__, hub.CUDAProperties is kernels.CUDAProperties)")
    done = run_from_root([sys.executable, "-c", code], stand_in_site)
    assert done.returncode == 0, done.stderr[-3000:]
    where, same = done.stdout.split()
    assert not Path(where).is_relative_to(ROOT) and same == "True"
    if stand_in_site is not None:
        assert where == str(stand_in_site / "kernels" / "__init__.py")


def test_rlr_fast_kernels_resolves_from_the_root():
    code = "import rlr_fast.kernels.ddim_step as m; print(m.__file__)"
    done = run_from_root([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.splitlines()[0]) == ROOT / "kernels" / "ddim_step.py"


@pytest.mark.slow
def test_finetune_from_the_root_with_the_kernels_distribution_installed(stand_in_site, tmp_path):
    sets = ["--set", "train_steps=1", "--set", f"out_dir={tmp_path / 'one'}"]
    done = run_from_root([sys.executable, "-m", "rlr_fast", "finetune", "--preset", "demo", *sets], stand_in_site)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "one" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_torchrun_from_the_root_with_the_kernels_distribution_installed(stand_in_site, tmp_path):
    sets = ["--set", "train_steps=1", "--set", f"out_dir={tmp_path / 'two'}"]
    done = run_from_root([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "rlr_fast", "finetune", "--preset", "demo", *sets], stand_in_site)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_pytest_collects_from_the_root_with_the_kernels_distribution_installed(stand_in_site):
    done = run_from_root([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "-p", "no:randomly"], stand_in_site)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# rlr_fast without its compiled extension


def import_without_compiled(code: str, cwd=ROOT):
    """`code` after `import rlr_fast` in a process where rlr_fast._C cannot be imported."""
    prelude = "import sys; sys.modules['rlr_fast._C'] = None  # as a missing or failed build\nimport rlr_fast\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_build_info_with_the_compiled_extension():
    import rlr_fast
    import torch

    info = rlr_fast.build_info()
    assert info["compiled"] is True and info["compiled_missing"] is None
    assert info["built_against_torch"] and torch.__version__.startswith(info["built_against_torch"])
    assert info["backend_cpu"] == "cpu"


def test_import_without_the_compiled_extension_warns_once_and_falls_back():
    code = """
import json, torch
from rlr_fast.ddim import ddim_step, ddim_step_reference
x, u, noise = (torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
c = [torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.0])]
same = all(torch.equal(a, b) for a, b in zip(ddim_step(x, u, noise, *c), ddim_step_reference(x, u, noise, *c)))
try:
    ddim_step(x, u, noise, *c, backend="cpu")
    refused = ""
except RuntimeError as e:
    refused = str(e)
print(json.dumps(dict(info=rlr_fast.build_info(), same=same, refused=refused)))
"""
    done = import_without_compiled(code)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    info = result["info"]
    assert info["compiled"] is False and info["cuda_kernels"] is False and info["built_against_torch"] is None
    assert "rlr_fast._C could not be imported" in info["compiled_missing"]
    assert "pip install -e . --no-build-isolation" in info["compiled_missing"]
    assert info["backend_cpu"] == "reference"
    assert info["backend_cuda"] == ("triton" if info["triton"] else "reference")
    assert result["same"]
    assert "backend 'cpu' asked for, but rlr_fast._C could not be imported" in result["refused"]
    warnings = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("rlr_fast: compiled kernels unavailable"), done.stderr


def test_a_source_tree_without_a_build_imports_and_finds_its_kernels(tmp_path):
    """A copy of the sources with no compiled extension (a failed build): rlr_fast imports from it,
    with rlr_fast.kernels reaching the top-level kernels/."""
    import shutil

    for name in ("rlr_fast", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = "import rlr_fast.kernels.reference as r; print(rlr_fast.__file__); print(r.__file__)"
    done = import_without_compiled(code, cwd=tmp_path)  # this venv's editable install would lend it ours
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "rlr_fast" / "__init__.py"),
                                   str(tmp_path / "kernels" / "reference.py")]
    assert "rlr_fast: compiled kernels unavailable" in done.stderr
