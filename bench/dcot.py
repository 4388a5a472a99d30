"""Prompt schedules with RLR: does aiming j at the fine prompt's steps help fine-tuning? (the paper's third claim)

The attribute: the shape colour, which the embedded model settles in the middle of the chain
(README, prompt schedules). For each demo prompt "a C S on a B background" the target colour is
C' = scripts/dcot_demo.fine_prompt's, and the reward is minus the mean squared RGB error of the
image's central box to C' (differentiable). Three arms fine-tune the LoRA at equal images scored:

  (a) plain:          every step conditioned on the demo prompt (which names C, not C')
  (b) schedule:       the demo prompt for the first SWITCH of the steps, then the fine prompt (naming C')
  (c) schedule + aim: (b) with RLR's j (and the zo_steps subsample) aimed at the fine prompt's steps
                      (aim_steps = [SWITCH, 1), aim_share 0.9)

Each arm is evaluated on the held-out demo prompts (demo_heldout), sampled as it was trained (plain,
or under the schedule), with fixed seeds: the reward, and the share of images whose shape colour
(`measure_colors`) is C'. The model before fine-tuning is evaluated the same way.

    nice -n 10 python bench/dcot.py              # bench/results/dcot.{md,csv,png}
    python bench/dcot.py --quick --out DIR       # tiny sizes (the suite's smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.*, scripts.*

from bench.common import RESULTS, current_device  # noqa: E402
from bench.plotting import Panel, Series, draw_panels  # noqa: E402
from scripts.dcot_demo import fine_prompt, images_under, schedule  # noqa: E402

SWITCH = 0.6  # the demo prompt for steps k / T < 0.6, the fine one after: the fine colour wins 21% at T = 10
ARMS = {"plain": dict(scheduled=False, aim=False), "schedule": dict(scheduled=True, aim=False),
        "schedule + aim": dict(scheduled=True, aim=True)}


@dataclass(frozen=True)
class Settings:
    base: dict  # finetune keys every arm shares
    train_steps: int
    seeds: tuple[int, ...]
    eval_prompts: int  # the first held-out prompts ...
    eval_seeds: tuple[int, ...]  # ... under these sampling seeds


FULL = Settings(base=dict(num_steps=10, batch_size=8, images_per_prompt=2, eta=1.0, guidance_scale=1.0, method="rlr",
                          first_order_steps=1, h=2, zo_steps=4, baseline="loo_prompt", lr=1e-2, warmup_steps=0),
                train_steps=12, seeds=(0, 1, 2, 3, 4), eval_prompts=8, eval_seeds=(1000, 1001))
QUICK = Settings(base=dict(num_steps=5, batch_size=2, images_per_prompt=2, eta=1.0, guidance_scale=1.0, method="rlr",
                           first_order_steps=1, h=2, zo_steps=1, baseline="loo_prompt", lr=1e-2, warmup_steps=0),
                 train_steps=2, seeds=(0,), eval_prompts=2, eval_seeds=(1000,))


def target_colour(prompt: str) -> str:
    return fine_prompt(prompt)[2]


def fine_colour_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """Minus the mean squared RGB error (in [0, 1]) of the central half of the image to the prompt's
    fine colour C'; at most 0."""
    from rlr_fast.demo_data import COLORS

    rgb = torch.tensor([COLORS[target_colour(p)] for p in prompts], dtype=images.dtype, device=images.device) / 255
    h, w = images.shape[-2:]
    centre = images[:, :, h // 4: h - h // 4, w // 4: w - w // 4]
    return -(centre - rgb[:, :, None, None]).square().mean(dim=(1, 2, 3))


def arm_keys(arm: str, settings: Settings, prompts: list[str]) -> dict:
    keys = dict(settings.base)
    if ARMS[arm]["scheduled"]:
        keys["prompt_schedule"] = schedule(SWITCH, prompts)
    if ARMS[arm]["aim"]:
        keys.update(aim_steps=(SWITCH, 1.0), aim_share=0.9)
    return keys


def evaluate(models, scheduled: bool, settings: Settings) -> dict:
    """Held-out reward and fine-colour accuracy (mean, standard error over images)."""
    from rlr_fast.demo_data import measure_colors
    from rlr_fast.presets import load_prompts

    prompts = load_prompts("demo_heldout")[:settings.eval_prompts]
    sampler = {k: settings.base[k] for k in ("num_steps", "eta", "guidance_scale")}
    images = images_under(models, SWITCH if scheduled else 1.0, settings.eval_seeds, sampler, prompts)
    per_image = [p for p in prompts for _ in settings.eval_seeds]  # images_under's rows: prompt-major
    reward = fine_colour_reward(images, per_image).numpy()
    pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    hits = np.array([measure_colors(image)["color"] == target_colour(p) for image, p in zip(pixels, per_image)])
    n = len(hits)
    return dict(reward=float(reward.mean()), reward_se=float(reward.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                accuracy=float(hits.mean()), accuracy_se=float(math.sqrt(hits.mean() * (1 - hits.mean()) / n)), n=n)


def run_one(arm: str, seed: int, settings: Settings) -> dict:
    """finetune one arm and seed in a temporary folder: its training records and held-out evaluation."""
    from rlr_fast import finetune
    from rlr_fast.inference import load_for_inference
    from rlr_fast.presets import load_prompts

    keys = arm_keys(arm, settings, load_prompts("demo"))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        result = finetune("demo", out_dir=tmp, overwrite=True, reward=fine_colour_reward, seed=seed,
                          train_steps=settings.train_steps, sample_prompts=0, checkpoint_every=0, tensorboard=False,
                          **keys)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        models = load_for_inference("default", str(result.out_dir), torch.device("cpu"), torch.float32)
        held_out = evaluate(models, ARMS[arm]["scheduled"], settings)
    return dict(arm=arm, seed=seed, images_scored=sum(r["reward_queries"] for r in records),
                train_reward=[r["reward_mean"] for r in records], wall_s=wall, **held_out)


def baseline(settings: Settings) -> dict:
    """The model before fine-tuning, sampled plain and under the schedule."""
    from rlr_fast.inference import load_for_inference

    with contextlib.redirect_stderr(io.StringIO()):
        models = load_for_inference("default", None, torch.device("cpu"), torch.float32)
        return {"plain": evaluate(models, False, settings), "schedule": evaluate(models, True, settings)}


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def summarise(runs: list[dict], base: dict) -> list[dict]:
    """One row per arm (mean and standard error over seeds) and the model before fine-tuning."""
    rows = [dict(arm=f"before fine-tuning ({name})", seeds=0, images_scored=0, heldout_reward=v["reward"],
                 heldout_reward_se=v["reward_se"], heldout_accuracy=v["accuracy"], heldout_accuracy_se=v["accuracy_se"],
                 last_quarter_train_reward=None, last_quarter_train_reward_se=None) for name, v in base.items()]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        quarter = max(1, len(mine[0]["train_reward"]) // 4)
        reward, reward_se = mean_se([r["reward"] for r in mine])
        accuracy, accuracy_se = mean_se([r["accuracy"] for r in mine])
        train, train_se = mean_se([np.mean(r["train_reward"][-quarter:]) for r in mine])
        rows.append(dict(arm=arm, seeds=len(mine), images_scored=mine[0]["images_scored"], heldout_reward=reward,
                         heldout_reward_se=reward_se, heldout_accuracy=accuracy, heldout_accuracy_se=accuracy_se,
                         last_quarter_train_reward=train, last_quarter_train_reward_se=train_se))
    return rows


def write(runs: list[dict], rows: list[dict], settings: Settings, out: Path, command: str,
          seconds: float) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = out / "dcot.md", out / "dcot.csv", out / "dcot.png"
    columns = ["arm", "seed", "images_scored", "reward", "reward_se", "accuracy", "accuracy_se", "n", "wall_s"]
    lines = [",".join(columns + ["train_reward"])]
    lines += [",".join(str(r[c]) for c in columns) + "," + " ".join(f"{v:.6g}" for v in r["train_reward"])
              for r in runs]
    csv_path.write_text("\n".join(lines) + "\n")

    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    b = settings.base
    lines = ["# Prompt schedule x RLR's aimed j: fine-tuning the shape colour a fine prompt names", "",
             f"Command: `{command}`. Device: {current_device(force_cpu=True).name}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}; {seconds / 60:.1f} min in all (one process, shared CPU).", "",
             f"Setting: `finetune` on the embedded default model, T = {b['num_steps']}, eta = {b['eta']}, no guidance, "
             f"rlr f = {b['first_order_steps']}, h = {b['h']}, zo_steps = {b['zo_steps']}, baseline loo_prompt, "
             f"lr {b['lr']}, {settings.train_steps} steps of {b['batch_size']} images (the same images scored "
             f"by every arm); schedule: the demo prompt for k / T < {SWITCH}, the fine prompt after; aim: "
             f"aim_steps = [{SWITCH}, 1), aim_share 0.9. Held out: the first {settings.eval_prompts} demo_heldout "
             f"prompts x seeds {list(settings.eval_seeds)}, sampled as trained. Seeds {list(settings.seeds)}: mean "
             "+- standard error over seeds (before fine-tuning: over images).", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n")
    panels = [Panel("training reward (batch mean)", "images scored", "reward", []),
                Panel("held-out accuracy by seed", "seed", "fine colour share", [])]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        curves = np.array([r["train_reward"] for r in mine])
        x = [(i + 1) * b["batch_size"] for i in range(curves.shape[1])]
        se = curves.std(0, ddof=1) / math.sqrt(len(mine)) if len(mine) > 1 else ()
        panels[0].series.append(Series(arm, x, curves.mean(0).tolist(), list(se)))
        panels[1].series.append(Series(arm, [r["seed"] for r in mine], [r["accuracy"] for r in mine]))
    draw_panels(png, panels, title="DCoT x aimed RLR on the embedded model")
    return [md, csv_path, png]


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, written to a temporary folder (or --out)")
    parser.add_argument("--out", type=Path, default=None, help="folder for dcot.md, .csv, .png")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/dcot.py", *(argv if argv is not None else sys.argv[1:])])
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = []
    for seed in settings.seeds:
        for arm in ARMS:
            runs.append(run_one(arm, seed, settings))
            print(f"{arm}, seed {seed}: held-out accuracy {runs[-1]['accuracy']:.3f}, reward {runs[-1]['reward']:.4f}, "
                  f"{runs[-1]['wall_s']:.0f} s", flush=True)
    rows = summarise(runs, baseline(settings))
    out = args.out or (Path(tempfile.mkdtemp(prefix="dcot_")) if args.quick else RESULTS)
    paths = write(runs, rows, settings, out, command, time.perf_counter() - start)
    for row in rows:
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return dict(runs=runs, rows=rows, paths=paths, settings=settings)


if __name__ == "__main__":
    main()
