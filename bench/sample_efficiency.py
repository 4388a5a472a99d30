"""Sample efficiency of every fine-tuning method: reward against reward queries, UNet work and wall
time, side by side (issue 12, section 3).

    python bench/sample_efficiency.py            # the full run: bench/results/sample_efficiency.{md,csv,png}
    python bench/sample_efficiency.py --quick    # tiny sizes, written to a temporary folder (the suite's test)

Each run is `rlr_fast.finetune` on the embedded default model (CPU, float32) with the demo preset's
sampling: T = 10 DDIM steps, eta = 1, no guidance, batches of 8 (4 prompts x 2 images), LoRA rank 4,
AdamW, gradient clipping at norm 1, no warm-up; the reward is `shaded_shape_colour` (below). Every
method spends the same budget of reward queries (images whose reward was taken) and uses the best
learning rate of the same grid, chosen on a tuning seed that no figure uses (the score: its mean
training reward over the last quarter of the budget). The figures average the figure seeds.

Counted per step by the training loop (metrics.jsonl): reward queries, UNet sample-steps forward and
backward (one sample through one step's model evaluation, rollouts included), wall seconds. A
sample-step's backward is converted to forward-equivalents with the FLOP ratio measured on the
model (torch.utils.flop_counter, LoRA and input gradients), so the middle panel's x axis is UNet
forward-equivalents of one sample at one step. The reward's own cost (VAE decode, and for pathwise
methods its backward) is in the queries and the wall time, not in the UNet axis.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import math
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.*, a source tree

from bench.common import RESULTS, current_device  # noqa: E402
from bench.plotting import Panel, Series, draw_panels  # noqa: E402


def shaded_shape_colour(images: torch.Tensor, prompts) -> torch.Tensor:
    """Minus the mean squared difference between the image and its prompt's shape colour shaded from
    full at the left edge to 20% at the right edge (RGB in [0, 1]); at most 0.

    Why this reward (measured on this model, lr 1e-2, 192 queries, 2026-12-01): it is differentiable,
    so pathwise methods run. It has an easy part, to paint the background in the shape's colour, which
    likelihood-ratio methods can learn from reward values alone because the shape's size varies
    between samples of one prompt (DDPO: -0.22 -> -0.15), and a hard part, the left-to-right
    shading, which needs the LoRA to break the model's left-right symmetry, so the maximum of 0 stays
    out of reach: full_bp rose from -0.26 to about -0.06 and was still creeping up. Rewards tried and
    rejected: the demo's `brightness` (full_bp 0.41 -> 0.98 of 1 in 5 steps: saturated), the same
    colour without shading (full_bp -0.38 -> -0.002 of 0: saturated), a grey left-to-right ramp or
    left-minus-right brightness (full_bp rises steadily, rlr and DDPO do not move in 192 queries).
    Whether a method saturates within the budget is measured by every run (gain_last_quarter).
    """
    from rlr_fast import demo_data

    colours = [demo_data.COLORS[demo_data.parse_prompt(p)["color"]] for p in prompts]
    rgb = torch.tensor(colours, dtype=images.dtype, device=images.device) / 255
    shade = torch.linspace(1.0, 0.2, images.shape[-1], dtype=images.dtype, device=images.device)
    return -(images - rgb[:, :, None, None] * shade).square().mean(dim=(1, 2, 3))


@dataclass(frozen=True)
class Method:
    label: str
    overrides: dict
    rlr: bool = False  # an RLR variant: the goal compares the best of them with DDPO


# DDPO's structure follows ddpo-pytorch's SD1.5 configuration: 4 optimizer steps per sampled epoch,
# one pass; here an epoch is 2 rollout batches of 8 and a minibatch 4 samples.
DDPO = dict(method="ddpo", ddpo_rollout_batches=2, ddpo_minibatches=4, ddpo_inner_epochs=1)


def methods(settings: "Settings") -> tuple[list[Method], list[str]]:
    """The methods compared, and a line for each planned one that is left out (none today). method=auto
    designs once, at the start, from `settings.auto_pilots` pilot batches: their reward queries come out
    of its budget (its curve starts after them), their UNet work is in its UNet axis."""
    rlr = dict(method="rlr", first_order_steps=1, h=2, j="uniform", baseline="loo")
    return [Method("rlr (f=1, h=2, uniform j, loo)", rlr, rlr=True),
            Method("rlr value", dict(rlr, baseline="value"), rlr=True),
            Method("auto", dict(method="auto", design_pilots=settings.auto_pilots), rlr=True),
            Method("zo (loo)", dict(method="zo", baseline="loo")),
            Method("ddpo", DDPO),
            Method("alignprop (random K)", dict(method="truncated_bp", truncated_bp_k="random")),
            Method("draft-1", dict(method="truncated_bp", truncated_bp_k=1)),
            Method("full_bp", dict(method="full_bp")),
            Method("sqdf", dict(method="sqdf"))], []


@dataclass(frozen=True)
class Settings:
    base: dict  # finetune keys every run shares
    budget: int  # reward queries per run
    bin: int  # queries per point of a curve
    lrs: tuple[float, ...]
    tune_seeds: tuple[int, ...]
    figure_seeds: tuple[int, ...]
    eval_prompts: int  # held-out evaluation of the final LoRA: the first prompts of the set ...
    eval_seeds: tuple[int, ...]  # ... under these sampling seeds
    workers: int
    auto_pilots: int  # method=auto's pilot batches


FULL = Settings(base=dict(num_steps=10, batch_size=8, images_per_prompt=2, warmup_steps=0), budget=192, bin=16,
                lrs=(1e-3, 3e-3, 1e-2), tune_seeds=(100,), figure_seeds=(0, 1, 2), eval_prompts=16,
                eval_seeds=(1000, 1001), workers=2, auto_pilots=8)
QUICK = Settings(base=dict(num_steps=3, batch_size=2, images_per_prompt=2, warmup_steps=0), budget=8, bin=4,
                 lrs=(3e-3,), tune_seeds=(), figure_seeds=(0, 1), eval_prompts=2, eval_seeds=(1000,), workers=1, auto_pilots=2)


def steps_for(overrides: dict, budget: int) -> int:
    """Optimizer steps that spend exactly `budget` reward queries (a ValueError if none do)."""
    batch = overrides["batch_size"] * overrides.get("grad_accum", 1)
    per_step, steps_per = batch, 1
    if overrides["method"] == "sqdf":  # each chain's x_0 for the record, and one soft Q per sample
        per_step = 2 * batch
    if overrides["method"] == "ddpo":
        per_step = overrides["batch_size"] * overrides["ddpo_rollout_batches"]
        steps_per = overrides["ddpo_inner_epochs"] * overrides["ddpo_minibatches"] // overrides.get("grad_accum", 1)
    if overrides["method"] == "auto":  # the design's pilots are scored once each
        budget -= overrides["design_pilots"] * batch
    if budget % per_step:
        raise ValueError(f"a budget of {budget} queries is not a whole number of {per_step}-query samplings")
    return budget // per_step * steps_per


# ------------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    label: str
    lr: float
    seed: int
    records: list[dict]
    wall_s: float  # the whole finetune call, model loading included
    cpu_s: float
    eval_mean: Optional[float] = None  # held-out reward of the final LoRA


def run_one(args: tuple) -> RunResult:
    """finetune one (method, lr, seed) in a temporary folder; its per-step records and, for a figure
    run, the held-out reward of its final LoRA."""
    method, lr, seed, settings, evaluate = args
    from rlr_fast import finetune
    from rlr_fast.inference import load_for_inference

    torch.set_num_threads(1)  # one core per worker
    keys = dict(settings.base, **method.overrides)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        start, cpu = time.perf_counter(), time.process_time()
        result = finetune("demo", out_dir=tmp, overwrite=True, reward=shaded_shape_colour, lr=lr, seed=seed,
                          train_steps=steps_for(keys, settings.budget), sample_prompts=0, checkpoint_every=0,
                          tensorboard=False, **keys)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        eval_mean = None
        if evaluate:
            models = load_for_inference("default", str(result.out_dir), torch.device("cpu"), torch.float32)
            eval_mean = held_out_reward(models, settings)
    return RunResult(method.label, lr, seed, records, wall, cpu, eval_mean)


# ------------------------------------------------------------------------------------------------
# Curves: one point per `bin` queries


@dataclass
class Curve:
    queries: np.ndarray  # (bins,) queries spent at the end of each bin
    reward: np.ndarray  # (bins,) mean reward of the images drawn in the bin
    unet: np.ndarray  # (bins,) UNet forward-equivalents spent when the next bin's first image is drawn
    seconds: np.ndarray  # (bins,) wall seconds, likewise


def curve(records: list[dict], bin_size: int, backward_cost: float) -> Curve:
    """A run's reward per bin of queries, with the cost spent until the next bin began (the whole
    run's for the last bin); method=auto's curve starts after its pilots' queries."""
    unet = np.cumsum([r["unet_forward_samples"] + backward_cost * r["unet_backward_samples"] for r in records])
    seconds = np.cumsum([r["seconds"] for r in records])
    queries = np.cumsum([r["reward_queries"] for r in records])
    design = [r.get("design_reward_queries", 0) for r in records]  # method=auto's pilots, at its first step
    if any(design[1:]):
        raise ValueError("curve charges a design's pilot queries at the first step only (design_every=0)")
    total = int(queries[-1])
    if total % bin_size:
        raise ValueError(f"{total} queries are not a whole number of bins of {bin_size}")
    bins = total // bin_size
    sums, counts = np.zeros(bins), np.zeros(bins)
    ends_unet, ends_seconds = np.full(bins, unet[-1]), np.full(bins, seconds[-1])
    before = 0
    for i, r in enumerate(records):
        if not r["reward_queries"]:
            continue
        if r["reward_mean"] is None:
            raise ValueError(f"step {r['step']} queried the reward but has no reward (skipped: {r['skipped']})")
        b = before // bin_size  # bins hold whole steps: bin_size is a multiple of every step's queries
        if b and before % bin_size == 0:  # the first images of bin b: bin b - 1 ends with the step before
            ends_unet[b - 1], ends_seconds[b - 1] = unet[i - 1], seconds[i - 1]
        sums[b] += r["reward_mean"] * r["reward_queries"]
        counts[b] += r["reward_queries"]
        before += r["reward_queries"]
    return Curve(design[0] + bin_size * np.arange(1, bins + 1), sums / counts, ends_unet, ends_seconds)


def mean_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis and its standard error (0 with one row)."""
    n = values.shape[0]
    se = values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), se


def late_gain(smoothed: np.ndarray, bins: int) -> float:
    """How much a smoothed curve rose over its last `bins` bins (over all of it when shorter: auto's
    curve starts after its design's queries)."""
    return float(smoothed[-1] - smoothed[max(0, len(smoothed) - 1 - bins)])


def _with_se(name: str, values: np.ndarray) -> dict:
    """{name: mean, name_se: its standard error} of per-seed values."""
    mean, se = mean_se(values[:, None])
    return {name: float(mean[0]), f"{name}_se": float(se[0])}


def first_reaching(queries: np.ndarray, smoothed: np.ndarray, target: float) -> Optional[int]:
    hits = np.nonzero(smoothed >= target)[0]
    return int(queries[hits[0]]) if hits.size else None


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    return np.array([values[max(0, i - window + 1):i + 1].mean() for i in range(len(values))])


# ------------------------------------------------------------------------------------------------
# The protocol


def backward_cost() -> float:
    """FLOPs of one UNet backward (LoRA and input gradients) per FLOP of its forward, on the embedded model."""
    from bench.common import flops_of
    from rlr_fast.default_model import load_default
    from rlr_fast.lora import add_lora

    models = load_default()
    unet = add_lora(models.unet, rank=4, alpha=4, seed=0)
    side = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, side, side, requires_grad=True)
    t, cond = torch.full((2,), 500), models.encode_prompts(["a red circle on a blue background"] * 2)

    def step(backward: bool):
        out = unet(x, t, encoder_hidden_states=cond).sample
        if backward:
            out.backward(torch.ones_like(out))

    forward = flops_of(lambda: step(False))
    return (flops_of(lambda: step(True)) - forward) / forward


def base_reward(settings: Settings) -> float:
    """The held-out reward of the model before fine-tuning (a fresh LoRA changes nothing)."""
    from rlr_fast.inference import load_for_inference

    with contextlib.redirect_stderr(io.StringIO()):
        return held_out_reward(load_for_inference("default", None, torch.device("cpu"), torch.float32), settings)


def held_out_reward(models, settings: Settings) -> float:
    """Mean reward of `models` on the first `eval_prompts` demo prompts x `eval_seeds` (fixed noise)."""
    from rlr_fast.presets import load_prompts
    from rlr_fast.inference import generate_images

    prompts = load_prompts("demo")[:settings.eval_prompts]
    images = generate_images(models, models.encode_prompts(prompts), None, settings.eval_seeds,
                             num_steps=settings.base["num_steps"], eta=1.0, guidance_scale=1.0)
    return float(shaded_shape_colour(images, prompts * len(settings.eval_seeds)).mean())  # seed-major


def run_many(jobs: list[tuple], workers: int, desc: str) -> list[RunResult]:
    """run_one over `jobs`, on `workers` processes (in this one when 1), with a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="run", dynamic_ncols=True) as bar:
        if workers == 1:
            results = []
            for job in jobs:
                results.append(run_one(job))
                bar.update(1)
            return results
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = []
            for result in pool.imap_unordered(run_one, jobs):
                results.append(result)
                bar.update(1)
            return results


@dataclass
class Study:
    settings: Settings
    methods: list[Method]
    missing: list[str]
    tuning: dict = field(default_factory=dict)  # label -> {lr: score}
    chosen: dict = field(default_factory=dict)  # label -> lr
    runs: dict = field(default_factory=dict)  # label -> figure RunResults
    backward_cost: float = 0.0
    base_reward: float = 0.0
    seconds: float = 0.0
    load: tuple = ()  # /proc/loadavg before and after


def tuning_score(records: list[dict], settings: Settings) -> float:
    """Mean training reward over the last quarter of the budget."""
    c = curve(records, settings.bin, 0.0)
    return float(c.reward[-max(1, len(c.reward) // 4):].mean())


def run_study(settings: Settings) -> Study:
    found, missing = methods(settings)
    study = Study(settings, found, missing, load=(_loadavg(),))
    start = time.perf_counter()
    study.backward_cost, study.base_reward = backward_cost(), base_reward(settings)
    # the costliest runs first, so that the workers finish together
    order = sorted(found, key=lambda m: m.overrides["method"] == "truncated_bp")
    if len(settings.lrs) > 1:
        jobs = [(m, lr, seed, settings, False) for m in order for lr in settings.lrs for seed in settings.tune_seeds]
        for r in run_many(jobs, settings.workers, "tuning runs"):
            study.tuning.setdefault(r.label, {}).setdefault(r.lr, []).append(tuning_score(r.records, settings))
        study.tuning = {label: {lr: float(np.mean(v)) for lr, v in sorted(scores.items())}
                        for label, scores in study.tuning.items()}
    study.chosen = {m.label: max(study.tuning[m.label], key=study.tuning[m.label].get) if study.tuning
                    else settings.lrs[0] for m in found}
    jobs = [(m, study.chosen[m.label], seed, settings, True) for m in order for seed in settings.figure_seeds]
    for r in run_many(jobs, settings.workers, "figure runs"):
        study.runs.setdefault(r.label, []).append(r)
    for runs in study.runs.values():
        runs.sort(key=lambda r: r.seed)
    study.seconds = time.perf_counter() - start
    study.load += (_loadavg(),)
    return study


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Summary


def summarise(study: Study) -> tuple[list[dict], dict, dict]:
    """Table rows (one per method), mean curves (label -> arrays), and the goal's numbers."""
    s = study.settings
    curves = {label: [curve(r.records, s.bin, study.backward_cost) for r in runs] for label, runs in study.runs.items()}
    bins = len(next(iter(curves.values()))[0].reward)
    window = max(1, bins // 6)
    quarter = max(1, bins // 4)
    mean_curves = {}
    for label, cs in curves.items():
        reward, se = mean_se(np.stack([c.reward for c in cs]))
        mean_curves[label] = dict(queries=cs[0].queries, reward=reward, se=se,
                                  unet=np.mean([c.unet for c in cs], axis=0),
                                  seconds=np.mean([c.seconds for c in cs], axis=0))
    final = {label: np.array([c.reward[-window:].mean() for c in cs]) for label, cs in curves.items()}
    ddpo_final = float(final["ddpo"].mean())
    full_bp_gain = float(final["full_bp"].mean()) - study.base_reward
    gain_target = study.base_reward + 0.9 * full_bp_gain
    rows = []
    for m in study.methods:
        cs, runs, mc = curves[m.label], study.runs[m.label], mean_curves[m.label]
        smooth = trailing_mean(mc["reward"], window)
        late = np.array([late_gain(trailing_mean(c.reward, window), quarter) for c in cs])
        held_out = np.array([r.eval_mean for r in runs])
        off_policy = [r["estimator"]["clip_fraction"] for run in runs for r in run.records
                      if "clip_fraction" in r["estimator"] and not r["reward_queries"]]
        rows.append({
            "method": m.label, "lr": study.chosen[m.label],
            **_with_se("final_reward", final[m.label]), **_with_se("held_out_reward", held_out),
            **_with_se("gain_last_quarter", late),
            "queries_to_ddpo_final": first_reaching(mc["queries"], smooth, ddpo_final),
            "queries_to_90pct_full_bp_gain": first_reaching(mc["queries"], smooth, gain_target),
            "unet_fwd_equiv_per_query": float(mc["unet"][-1] / s.budget),
            "wall_s_per_run": float(np.mean([r.wall_s for r in runs])),
            "cpu_s_per_run": float(np.mean([r.cpu_s for r in runs])),
            "clip_fraction_off_policy": float(np.mean(off_policy)) if off_policy else None,
        })
    rlr_rows = [r for r, m in zip(rows, study.methods) if m.rlr]
    reached = [r for r in rlr_rows if r["queries_to_ddpo_final"] is not None]
    best = min(reached, key=lambda r: r["queries_to_ddpo_final"]) if reached else \
        max(rlr_rows, key=lambda r: r["final_reward"])
    goal = dict(ddpo_final=ddpo_final, full_bp_gain=full_bp_gain, gain_target=gain_target, window=window,
                best_rlr=best["method"], best_rlr_queries=best["queries_to_ddpo_final"], budget=s.budget,
                met=best["queries_to_ddpo_final"] is not None and 3 * best["queries_to_ddpo_final"] <= s.budget)
    return rows, mean_curves, goal


# ------------------------------------------------------------------------------------------------
# Files


def _cell(value, column: str = "", digits: int = 4) -> str:
    if value is None:
        return "not reached" if column.startswith("queries_to") else ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write(study: Study, rows: list[dict], mean_curves: dict, goal: dict, out: Path, command: str) -> list[Path]:
    """<out>/sample_efficiency.md (protocol, table, goal), .csv (every figure run's curve) and .png."""
    s = study.settings
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = out / "sample_efficiency.md", out / "sample_efficiency.csv", out / "sample_efficiency.png"
    device = current_device(force_cpu=True)
    lines = [
        "# Sample efficiency: reward against reward queries, UNet work and wall time", "",
        f"Command: `{command}`. Device: {device.name}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. {s.workers} worker process(es), one thread each. Total wall clock "
        f"{study.seconds / 60:.1f} min. Load average (1, 5, 15 min; `/proc/loadavg`) at the start: {study.load[0]}; "
        f"at the end: {study.load[-1]}" + (" -- the machine was shared, so wall times are contended (CPU seconds "
                                            "are less so)." if _contended(study.load, s.workers) else "."), "",
        f"Setting: `finetune` on the embedded default model, T = {s.base['num_steps']}, eta = 1, batches of "
        f"{s.base['batch_size']} ({s.base['images_per_prompt']} images per prompt), LoRA rank 4, AdamW, clip 1, "
        f"reward `shaded_shape_colour` (bench/sample_efficiency.py says why). Budget: {s.budget} reward queries per "
        f"run. Learning rate: the best of {list(s.lrs)} on tuning seed(s) {list(s.tune_seeds)} (score: mean training "
        f"reward over the last quarter of the budget); figures: seeds {list(s.figure_seeds)}, mean +- standard "
        f"error. DDPO: {DDPO['ddpo_rollout_batches']} rollout batches per epoch, {DDPO['ddpo_minibatches']} "
        f"minibatches, {DDPO['ddpo_inner_epochs']} pass, clip range 1e-4, advantages from each prompt's last 16 "
        f"rewards once it has 16 (the epoch's statistics before).", "",
        f"Not compared (yet): {'; '.join(study.missing)}." if study.missing else "Every planned method ran.", "",
        f"Columns: final_reward = mean training reward over the last {goal['window']} bins of {s.bin} queries; "
        f"held_out_reward = the final LoRA on {s.eval_prompts} prompts x seeds {list(s.eval_seeds)} (before "
        f"fine-tuning: {study.base_reward:.4g}); gain_last_quarter = the smoothed training reward at the end minus "
        f"a quarter of the budget earlier (a saturated method shows ~0); queries_to_* = the first bin at which the "
        f"smoothed (trailing {goal['window']} bins) seed-mean reward reaches DDPO's final reward "
        f"({goal['ddpo_final']:.4g}) or base + 90% of full_bp's final gain ({goal['gain_target']:.4g}); "
        f"unet_fwd_equiv_per_query: UNet forward-equivalents of one sample-step, a backward counted as "
        f"{study.backward_cost:.3f} forwards (FLOPs measured on the model), per reward query; wall and CPU seconds "
        f"of one whole run (model loading included).", "",
    ]
    columns = list(rows[0])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c], c) for c in columns) + " |" for r in rows]
    lines += ["", "Tuning scores (mean training reward over the last quarter of the budget, tuning seeds):", ""]
    if study.tuning:
        lines += ["| method | " + " | ".join(f"lr {lr:g}" for lr in s.lrs) + " |", "|---|" + "---|" * len(s.lrs)]
        lines += [f"| {label} | " + " | ".join(_cell(scores.get(lr)) for lr in s.lrs) + " |"
                  for label, scores in study.tuning.items()]
    else:
        lines += ["(one learning rate in the grid: no tuning runs)"]
    ratio = None if goal["best_rlr_queries"] is None else goal["best_rlr_queries"] / s.budget
    lines += ["", f"Goal (the best RLR variant reaches DDPO's final reward with at most 1/3 of DDPO's {s.budget} "
                  f"queries): {'met' if goal['met'] else 'NOT met'}. Best RLR variant: {goal['best_rlr']}, "
                  + (f"{goal['best_rlr_queries']} queries ({ratio:.2f} of DDPO's)." if ratio is not None else
                     "which never reached DDPO's final reward within the budget."), ""]
    md.write_text("\n".join(lines) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "lr", "seed", "queries", "reward", "unet_fwd_equiv", "wall_s"])
        for label, runs in study.runs.items():
            for r in runs:
                c = curve(r.records, s.bin, study.backward_cost)
                writer.writerows([label, f"{r.lr:g}", r.seed, q, f"{rew:.6g}", f"{u:.6g}", f"{sec:.4g}"]
                                 for q, rew, u, sec in zip(c.queries, c.reward, c.unet, c.seconds))
    series = {axis: [Series(m.label, mean_curves[m.label][axis], mean_curves[m.label]["reward"],
                            mean_curves[m.label]["se"]) for m in study.methods]
              for axis in ("queries", "unet", "seconds")}
    draw_panels(png, [Panel("reward vs reward queries", "reward queries (images scored)", "reward", series["queries"]),
                      Panel("reward vs UNet work", "UNet forward-equivalents (one sample, one step)", "reward",
                            series["unet"]),
                      Panel("reward vs wall time" + (" (contended)" if _contended(study.load, s.workers) else ""),
                            "wall seconds of training steps", "reward", series["seconds"])],
                title=f"shaded_shape_colour on the embedded model, mean +- s.e. over seeds {list(s.figure_seeds)}; "
                      f"{device.name}, {datetime.date.today().isoformat()}")
    return [md, csv_path, png]


def _contended(loads: tuple, workers: int) -> bool:
    """A 1-minute load average above this run's own workers at either end means others were running."""
    values = [float(v.split()[0]) for v in loads if v != "unknown"]
    return any(v > workers + 0.5 for v in values)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, written to a temporary folder (or --out): the suite's smoke test")
    parser.add_argument("--out", type=Path, default=None, help="folder for the three result files")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 2; --quick: 1)")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/sample_efficiency.py", *(argv if argv is not None else sys.argv[1:])])
    settings = QUICK if args.quick else FULL
    if args.workers is not None:
        settings = replace(settings, workers=args.workers)
    study = run_study(settings)
    rows, mean_curves, goal = summarise(study)
    out = args.out or (Path(tempfile.mkdtemp(prefix="sample_efficiency_")) if args.quick else RESULTS)
    paths = write(study, rows, mean_curves, goal, out, command)
    for row in rows:
        print(", ".join(f"{k}={_cell(v, k)}" for k, v in row.items()))
    print(f"goal met: {goal['met']} ({goal['best_rlr']}: {goal['best_rlr_queries']} of {settings.budget} queries); "
          f"wrote {', '.join(str(p) for p in paths)}; {study.seconds / 60:.1f} min")
    return dict(study=study, rows=rows, curves=mean_curves, goal=goal, paths=paths)


if __name__ == "__main__":
    main()
