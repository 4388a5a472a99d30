"""bench/gpu_check.sh and its report: the dry run on the CPU (the same stages and Python entry points
as the GPU run, tiny shapes), the budget and failure handling, the report's reading of results, and
the unfused baseline bench/speed.py times the fused kernels against."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from step_cases import step_inputs

from rlr_fast.ddim import ddim_step_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_report  # noqa: E402
from bench.common import unfused_ddim_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(tmp_path, *args, timeout=1200, **env):  # a busy 2-core CPU: minutes
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--results", str(tmp_path / "results"), *args],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "results" / "cpu.md").read_text()
    for stage in ("setup", "build", "tests", "ncu", "memory", "speed"):
        assert f"| {stage} | ok |" in report, stage
    assert "GPU figures: not measured" in report and "build_info {" in report
    assert "tests collected" in report  # the GPU test files import and collect
    # the speed stage ran bench/speed.py's three sections, the ncu stage its kernel section alone
    for section in ("| kernel | ddim_step forward [cpu]", "| rollout | rlr_fast.rollout", "| update | RLR, naive"):
        assert section in report, section
    assert "section=kernel, name=ddim_step forward [cpu]" in result.stdout.split("=== stage ncu")[1]
    assert "peak_gib=" in report and "RLR peak over T" in report  # bench/memory.py's contract, read
    copied = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "cpu.md" in copied and "gpu_check.log" in copied and len(copied) <= 8
    assert "stage timings" in result.stdout


def test_a_dry_run_writes_only_into_a_scratch_folder(tmp_path):
    """Without --results a dry run writes under /tmp, never into the committed bench/results or the
    source tree, and its stages (subshells) see where the results go."""
    before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--stages", "setup"], cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = Path(result.stdout.split("results go to ")[1].split()[0])
    try:
        assert results.parent == Path("/tmp") and results.name.startswith("gpu_check_dry_run.")
        assert (results / "gpu_check.log").is_file() and (results / "cpu.md").is_file()
    finally:
        shutil.rmtree(results)
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").iterdir()} == before
    assert not (ROOT / "rlr_fast" / "kernels").is_symlink()
    assert {"cpu.md", "gpu_check.log"} <= {p.name for p in out.iterdir()}


def test_the_stage_limits_fit_the_budget():
    """The stages' limits and the time kept for the report add up to under the 455 s a device session has."""
    text = SCRIPT.read_text()
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A LIMIT=\((.*)\)", text).group(1)))
    budget = int(re.search(r"^GPU_BUDGET_S=(\d+)", text, re.M).group(1))
    report = int(re.search(r"^REPORT_S=(\d+)", text, re.M).group(1))
    order = re.search(r"^ORDER=\((.*)\)", text, re.M).group(1).split()
    assert set(limits) == set(order) == {"setup", "build", "memory", "speed", "tests", "ncu"}
    assert budget <= 455 and sum(int(v) for v in limits.values()) + report < budget
    assert order.index("memory") < order.index("tests") and order.index("speed") < order.index("tests")


def test_a_failing_stage_fails_the_run(tmp_path):
    result = _run(tmp_path, "--stages", "setup", timeout=60, PYTHON="false")
    assert result.returncode == 1
    assert "stage setup: FAILED" in result.stdout


@pytest.mark.slow
def test_a_stage_without_time_left_is_skipped_and_fails_the_run(tmp_path):
    result = _run(tmp_path, "--stages", "setup", timeout=60, BUDGET_S="20")
    assert result.returncode == 1
    assert "SKIPPED: time budget spent" in (tmp_path / "results" / "cpu.md").read_text()


@pytest.mark.slow
def test_gpu_tests_refuse_to_skip_when_a_gpu_is_required(tmp_path):
    """RLR_FAST_REQUIRE_GPU=1 (the tests stage on a GPU) turns a CPU-only run into an error."""
    env = dict(os.environ, RLR_FAST_REQUIRE_GPU="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                             "--collect-only", "tests/test_compiled.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "RLR_FAST_REQUIRE_GPU=1, but this run lacks a CUDA device" in result.stdout + result.stderr


def _memory_csv(path, rows):
    columns = ["source", "model", "method", "T", "h", "peak_gib_budget_plan", "peak_gib"]
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_memory_flatness_reads_measured_peaks_over_estimates(tmp_path):
    path = tmp_path / "memory.csv"
    rows = [dict(model="SD1.4 random weights", method="rlr", T=T, h=h, peak_gib=peak, peak_gib_budget_plan=9.0)
            for T, h, peak in ((20, 1, 3.0), (20, 4, 3.2), (50, 1, 3.1), (50, 4, 3.6))]
    rows.append(dict(model="SD1.4 random weights", method="naive_one_graph_rlr", T=50, h=4, peak_gib=80.0))
    _memory_csv(path, rows)
    over_t, over_h = gpu_report.memory_flatness(path)
    assert over_t == ("RLR peak over T (h = 4, measured): T = 20: 3.200 GiB, T = 50: 3.600 GiB; "
                      "last / first = 1.125")
    assert over_h.startswith("RLR peak over h (T = 50, measured): h = 1: 3.100 GiB, h = 4: 3.600 GiB")
    # estimates only (a CPU run): the planner's column, said to be estimated
    _memory_csv(path, [dict(model="SD1.4", method="rlr", T=T, h=4, peak_gib_budget_plan=p) for T, p in ((10, 5.0),
                                                                                                     (50, 5.5))])
    assert gpu_report.memory_flatness(path) == [
        "RLR peak over T (h = 4, ESTIMATED by the planner): T = 10: 5.000 GiB, T = 50: 5.500 GiB; last / first = 1.100"]


def test_unfused_baseline_computes_the_fused_step():
    """bench/speed.py times the fused kernels against this baseline: it must compute the same op."""
    x, u, c, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), torch.float32, "cpu", cfg=True)
    sigma[0] = 0.7  # the baseline, like a scheduler, has no sigma == 0 special case
    expected = ddim_step_reference(x, u, noise, c_x, c_e, sigma, model_output_cond=c, guidance_scale=7.5)
    for a, e in zip(unfused_ddim_step(x, u, noise, c_x, c_e, sigma, c, 7.5), expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)
