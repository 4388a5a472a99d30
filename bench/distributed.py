"""Time per optimizer step of the same run at world size 1 and 2 (torchrun; gloo on the CPU).

    python bench/distributed.py                  # the demo preset on this machine's CPU
    python bench/distributed.py --steps 20 --set batch_size=16 --runs 1x1 2x1

Each row is a real `rlr-fast finetune` of one config (the demo preset unless --set changes it):
world size 1 with 2 threads and with 1, and world size 2 under torchrun with 1 thread per rank
(what torchrun sets), the same global batch in every case. The time per step is the median of
metrics.jsonl's `seconds` over the steps after the first two (warm-up), and throughput is the
global batch over it. The load average is printed beside them: on a shared machine the numbers
say as much about the neighbours as about the code. Results: bench/results/distributed_cpu.md/.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402

WARMUP_STEPS = 2


def run(world: int, threads: int, sets: list[str], out: Path) -> dict:
    """One finetune of `sets` at `world` ranks with `threads` threads each; its measured row."""
    finetune = ["-m", "rlr_fast", "finetune", "--preset", "demo", "--out", str(out)] + [
        arg for s in sets for arg in ("--set", s)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)] if world > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()[0]
    wall = time.perf_counter()
    done = subprocess.run([sys.executable, *launcher, *finetune], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if done.returncode != 0:
        raise SystemExit(f"world size {world} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records[WARMUP_STEPS:]]
    config = yaml.safe_load((out / "config.yaml").read_text())
    step = statistics.median(seconds)
    batch = config["batch_size"] * config["grad_accum"]
    return {"world_size": world, "threads_per_rank": threads, "global_batch": batch,
            "steps_timed": len(seconds), "median_s_per_step": step, "min_s_per_step": min(seconds),
            "samples_per_s": batch / step,
            "peak_rss_rank0_mib": records[-1]["peak_memory_bytes"] / 2**20, "wall_s": wall,
            "load_avg_1min": (load_before + os.getloadavg()[0]) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run")
    parser.add_argument("--runs", nargs="+", default=["1x2", "1x1", "2x1"], metavar="WORLDxTHREADS",
                        help="world size x threads per rank of each run; the first is the speed-up's base "
                             "(default: 1x2 1x1 2x1)")
    args = parser.parse_args()
    try:
        runs = [tuple(int(n) for n in r.split("x")) for r in args.runs]
    except ValueError:
        raise SystemExit(f"--runs takes WORLDxTHREADS like 2x1, got {args.runs}") from None
    sets = [f"train_steps={args.steps}", "sample_every=0", "checkpoint_every=0", "sample_seeds=[0]",
            "tensorboard=false", "device=cpu", *args.sets]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in runs:
            row = run(world, threads, sets, Path(tmp) / f"w{world}t{threads}")
            rows.append(row)
            print(json.dumps(row))
    base = rows[0]["median_s_per_step"]
    for row in rows:
        row[f"speedup_vs_{args.runs[0]}"] = base / row["median_s_per_step"]
    header = (f"# Data parallel step time — CPU ({platform.machine()}, {os.cpu_count()} cores)\n\n"
              f"torch {torch.__version__}, gloo, float32; `rlr-fast finetune --preset demo` with "
              f"{' '.join(sets)}; median over steps {WARMUP_STEPS + 1}..{args.steps} (the first "
              f"{WARMUP_STEPS} are warm-up); {time.strftime('%Y-%m-%d')}.\n\n"
              "**CPU figures**: they show what gloo data parallelism does on this machine's cores, "
              "nothing about GPUs (not measured). Peak memory is rank 0's resident set. A load average "
              "above the core count means a shared machine: there, two processes also win a bigger share of "
              "the cores than one, and the speed-up mixes both effects.")
    csv_path, md_path = write_results("distributed_cpu", rows, header)
    print(f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
