"""The report of bench/gpu_check.sh: <results>/<device>.md, every figure of the run in one file.

    python bench/gpu_report.py RESULTS WORK [--dry-run]

WORK holds what gpu_check.sh's stages left: stages.tsv (stage, status, seconds, limit per line) and
<stage>.log for each stage that ran; RESULTS holds the benchmarks' files (speed_<device>.md,
memory_<device>.md and .csv, ncu.txt). Prints the report's path.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import current_device  # noqa: E402

NCU_LINES = ("Duration", "DRAM Throughput", "Memory Throughput", "Elapsed Cycles")


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "none"


def tail(path: Path, lines: int) -> str:
    if not path.exists():
        return "(stage not run)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def ncu_summary(results: Path, work: Path) -> str:
    """The kernel names and their duration / throughput lines, or the stage's last lines."""
    path = results / "ncu.txt"
    if not path.exists():
        return tail(work / "ncu.log", 8)
    keep = [line for line in path.read_text(errors="replace").splitlines()
            if any(key in line for key in NCU_LINES) or (line.startswith("  ") and "(" in line and ")x(" in line)]
    return "\n".join(keep) or tail(path, 20)


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def memory_flatness(csv_path: Path) -> list[str]:
    """The RLR update's peak over T (at the largest h) and over h (at the largest T): measured
    max_memory_allocated where the CSV has it (GPU), else the planner's estimate for its plan."""
    if not csv_path.exists():
        return ["(no memory results)"]
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("method") == "rlr" and r.get("model", "").startswith("SD1.4")
                and r.get("precision", "float16") == "float16"]  # the precision finetune runs on a GPU
    column = "peak_gib" if any(_number(r.get("peak_gib")) is not None for r in rows) else "peak_gib_budget_plan"
    kind = "measured" if column == "peak_gib" else "ESTIMATED by the planner"
    points = {(int(r["T"]), int(float(r["h"]))): _number(r.get(column)) for r in rows if r.get("h")}
    points = {k: v for k, v in points.items() if v is not None}
    if not points:
        return ["(no RLR rows with a peak)"]
    lines = []
    h_max, t_max = max(h for _, h in points), max(t for t, _ in points)
    over_t = sorted((t, v) for (t, h), v in points.items() if h == h_max)
    over_h = sorted((h, v) for (t, h), v in points.items() if t == t_max)
    for name, series, fixed in (("T", over_t, f"h = {h_max}"), ("h", over_h, f"T = {t_max}")):
        if len(series) > 1:
            values = ", ".join(f"{name} = {x}: {v:.3f} GiB" for x, v in series)
            ratio = series[-1][1] / series[0][1]
            lines.append(f"RLR peak over {name} ({fixed}, {kind}): {values}; last / first = {ratio:.3f}")
    return lines or ["(one RLR point only: no flatness to read)"]


def section(title: str, body: str, code: bool = False) -> list[str]:
    return [f"## {title}", ""] + (["```", body, "```"] if code else [body]) + [""]


def demoted(path: Path) -> str:
    """A results file's markdown with every heading one level down, to sit under a section."""
    if not path.exists():
        return "(not written)"
    return "\n".join("#" + line if line.startswith("#") else line for line in path.read_text().splitlines())


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    results, work = args.results, args.work
    device = current_device()
    stages = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines() if line]
    build = [line for line in tail(work / "build.log", 400).splitlines() if line.startswith("build_info")]
    memory_lines = [line for line in tail(work / "memory.log", 400).splitlines()
                    if line.startswith(("target", "peak_gib="))]

    lines = [f"# GPU check — {device.name}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; driver {driver_version()}; torch "
             f"{torch.__version__}; bench/gpu_check.sh{' --dry-run' if args.dry_run else ''}.", ""]
    if args.dry_run:
        lines += ["**Dry run on a CPU**: tiny shapes in the current environment, no wheels, no build, no ncu;",
                  "every figure below is a CPU figure that exercises the code paths. GPU figures: not measured.", ""]
    lines += [build[-1] if build else "build_info: (build stage not run)", "", "## Stages", "",
              "| stage | status | seconds | limit (s) |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(fields)} |" for fields in stages]
    lines += ["", f"Total: {sum(int(f[2] or 0) for f in stages if len(f) > 2)} s.", ""]
    lines += section("Versions", tail(work / "setup.log", 14), code=True)
    lines += section("Tests", tail(work / "tests.log", 25), code=True)
    lines += section("Nsight Compute: the fused forward kernels in the NVTX range ddim_step",
                     ncu_summary(results, work), code=True)
    lines += section("Memory (bench/memory.py)", "\n".join(
        [f"    {line}" for line in memory_lines] + [""] + [f"- {line}" for line in
                                                           memory_flatness(results / f"memory_{device.label}.csv")]
        + ["", demoted(results / f"memory_{device.label}.md")]))
    lines += section("Speed (bench/speed.py)", demoted(results / f"speed_{device.label}.md"))
    report = results / f"{device.label}.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
