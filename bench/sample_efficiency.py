"""Where RLR wins, shown honestly: reward against images scored on two tracks, each method run as its
authors run it, with UNet work and wall time beside (issue 20).

    python bench/sample_efficiency.py            # bench/results/sample_efficiency.{md,csv,png}
    python bench/sample_efficiency.py --quick    # tiny sizes, written to a temporary folder (the suite's test)
    python bench/sample_efficiency.py --long     # the main contests again at 960 images: sample_efficiency_long.*

Each run is `rlr_fast.finetune` on the embedded default model (CPU, float32; latent 4 x 8 x 8, D = 256)
with the demo preset's sampling: T = 10 DDIM steps, eta = 1, no guidance, batches of 8 (4 prompts x 2
images), LoRA rank 4, AdamW, gradient clipping at norm 1, no warm-up. Two tracks:

- black-box: the reward is JPEG compressibility of the decoded 64 px image (minus its size in kB at
  quality 95; DDPO's own black-box reward). Encoding is discrete, so the reward has no usable
  gradient: only estimators that need the reward's value alone run (rlr with f = 0: H + C; zo; DDPO; GRPO).
- differentiable: `shaded_shape_colour` (below): every method, pathwise ones included.

Budgets are in **images scored** (`reward_images`: every image the reward scored, value-baseline
proxies and design pilots included), the same for every method of a track. Each method's learning
rate is the best of a grid on 2 tuning seeds that no figure uses, the grid extended by factors of 3
until the best value is interior (a larger and a smaller value both score worse) or 4 extensions ran;
figures average >= 5 other seeds. The method tables are plain mappings: a new method is one entry.
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
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

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


def jpeg_compressibility(images: torch.Tensor, prompts) -> torch.Tensor:
    """Minus the JPEG size in kB (rlr_fast.rewards.compression): no gradient path to the images."""
    from rlr_fast.rewards.compression import jpeg_size_kb

    return -jpeg_size_kb(images).to(images.dtype)


# DDPO as ddpo-pytorch runs it (config/dgx.py: 4 optimizer steps per sampled epoch, one pass, clip range
# 1e-4 on per-element-mean log-probabilities, advantages clipped at 10, per-prompt statistics); scaled to
# our budget: an epoch is 4 rollout batches of 8 (32 images) and a minibatch 8, a quarter of the epoch as
# theirs, and a prompt's own statistics switch on at 4 rewards (theirs: 16 of 256 images per epoch
# over ~400 prompts would never switch on in 200 images).
DDPO = dict(method="ddpo", ddpo_rollout_batches=4, ddpo_minibatches=4, ddpo_inner_epochs=1, clip_range=1e-4,
            ddpo_adv_clip=10.0, ddpo_buffer_size=16, ddpo_min_count=4)
# GRPO as Flow-GRPO runs it (config/base.py, config/grpo.py: clip range 1e-4 on per-element-mean log-probabilities,
# advantages clipped at 5, timestep_fraction 0.99, beta 0.04) in DDPO's epochs above, groups of images_per_prompt.
# Their KL divides by their SDE's noise level squared, not the step's variance: ours is theirs / dt, so their beta
# is grpo_beta = 0.04 x dt with dt ~ 1 / T = 0.1 here (docs/estimator.md §8.5).
GRPO = dict(method="grpo", ddpo_rollout_batches=4, ddpo_minibatches=4, ddpo_inner_epochs=1, clip_range=1e-4,
            ddpo_adv_clip=5.0, grpo_beta=0.004, grpo_step_fraction=0.99)
RLR_F0 = dict(method="rlr", first_order_steps=0, h=2, j="uniform")
RLR_F1 = dict(method="rlr", first_order_steps=1, h=2, j="uniform")
SURROGATE = dict(baseline="value", value_proxy="surrogate")
# SQDF's public training script (aesthetic setting; rlr_fast/presets.py `sqdf` lists its values): alpha_pub = 2.0
# on a per-element-mean KL,
# ours = 2.0 x 2 / D with D = 4 x 8 x 8 = 256 (docs/estimator.md §11.3); gamma 0.9; a replay buffer of
# 1024 chains, one update per fresh batch.
SQDF_PUBLIC = dict(method="sqdf", sqdf_alpha=2.0 * 2 / 256, sqdf_gamma=0.9, replay_capacity=1024, replay_ratio=1)

BLACK_BOX = {  # label -> finetune keys
    "rlr f=0 h=2 (H+C), loo": dict(RLR_F0, baseline="loo"),
    "rlr f=0 h=2, value (surrogate proxy)": dict(RLR_F0, **SURROGATE),
    "rlr f=0 h=2, value (reward proxy)": dict(RLR_F0, baseline="value"),
    "zo (loo)": dict(method="zo", baseline="loo"),
    "zo, value (surrogate proxy)": dict(method="zo", **SURROGATE),
    "ddpo (ddpo-pytorch settings)": DDPO,
    "grpo (flow-grpo settings)": GRPO,
    # variants with a cosine decay of the lr (ddpo-pytorch's is constant): at 960 images RLR's constant step gave
    # up its early lead, so both get the same decay and the same tuning
    "rlr f=0 h=2 (H+C), loo, cosine lr": dict(RLR_F0, baseline="loo", lr_scheduler="cosine"),
    "ddpo (ddpo-pytorch settings), cosine lr": dict(DDPO, lr_scheduler="cosine"),
}
DIFFERENTIABLE = {
    "rlr f=1 h=2, loo": dict(RLR_F1, baseline="loo"),
    "rlr f=1 h=2, value (surrogate proxy)": dict(RLR_F1, **SURROGATE),
    "rlr f=0 h=2, value (surrogate proxy)": dict(RLR_F0, **SURROGATE),
    "auto": dict(method="auto", design_pilots=4),
    "zo (loo)": dict(method="zo", baseline="loo"),
    "ddpo (ddpo-pytorch settings)": DDPO,
    "grpo (flow-grpo settings)": GRPO,
    "alignprop (random K)": dict(method="truncated_bp", truncated_bp_k="random"),
    "draft-1": dict(method="truncated_bp", truncated_bp_k=1),
    "full_bp": dict(method="full_bp"),
    "sqdf (public script)": SQDF_PUBLIC,
    "sqdf variant: alpha 0, gamma 1, no replay": dict(method="sqdf"),
}


@dataclass(frozen=True)
class Track:
    name: str
    reward: Callable  # (images, prompts) -> (B,)
    methods: dict  # label -> finetune keys
    why: str


TRACKS = {
    "black-box": Track("black-box", jpeg_compressibility, BLACK_BOX,
                       "JPEG compressibility: no gradient (encoding is discrete), so only the reward's value counts"),
    "differentiable": Track("differentiable", shaded_shape_colour, DIFFERENTIABLE,
                            "shaded_shape_colour: differentiable, every method runs"),
}


def unbiased_rlr(keys: dict) -> bool:
    """An RLR variant the goal compares with DDPO: method rlr, no batch-normalised scale."""
    return keys["method"] == "rlr" and not keys.get("normalize", False)


@dataclass(frozen=True)
class Settings:
    base: dict  # finetune keys every run shares
    budget: int  # images scored per run
    bin: int  # images per point of a curve
    lrs: tuple[float, ...]  # the starting grid
    extensions: int  # at most this many grid extensions per side
    tune_seeds: tuple[int, ...]
    figure_seeds: tuple[int, ...]
    eval_prompts: int  # held-out evaluation of the final LoRA: the first prompts of the set ...
    eval_seeds: tuple[int, ...]  # ... under these sampling seeds
    workers: int
    tracks: tuple[str, ...] = ("black-box", "differentiable")
    methods: Optional[tuple[tuple[str, str], ...]] = None  # only these (track, label)s (None: every method)
    figure_budget: Optional[int] = None  # figure runs at this many images (None: `budget`); lrs tuned at `budget`
    figure_bin: Optional[int] = None

    def figures(self) -> "Settings":
        """The settings of the figure runs and their summary: the tuning budget unless a longer one is set."""
        if self.figure_budget is None:
            return self
        return replace(self, budget=self.figure_budget, bin=self.figure_bin or self.bin, figure_budget=None)


FULL = Settings(base=dict(num_steps=10, batch_size=8, images_per_prompt=2, warmup_steps=0), budget=192, bin=16,
                lrs=(3e-3, 1e-2, 3e-2), extensions=4, tune_seeds=(100, 101), figure_seeds=(0, 1, 2, 3, 4),
                eval_prompts=16, eval_seeds=(1000,), workers=2)
QUICK = Settings(base=dict(num_steps=3, batch_size=4, images_per_prompt=2, warmup_steps=0), budget=32, bin=8,
                 lrs=(3e-3,), extensions=0, tune_seeds=(), figure_seeds=(0, 1), eval_prompts=2,
                 eval_seeds=(1000,), workers=1)
# The long budget: enough images for DDPO's per-prompt statistics (on after ~64) and 30 of its epochs to act. It runs
# the contests that decide a user's choice, not every method (a 960-image run costs ~2 CPU min here): on the
# black-box track RLR f = 0 against the likelihood-ratio peers (RLR's home ground), with and without a cosine lr; on
# the differentiable track the best unbiased RLR variant of the short budget against full_bp (the pathwise leader) and
# DDPO. Each lr is tuned again at 960 images, starting from the short budget's choice and a third of it (a longer
# run rarely wants a larger step) and extended by factors of 3 like the short grid until the best is interior.
LONG = replace(FULL, figure_budget=960, figure_bin=48,
               methods=(("black-box", "rlr f=0 h=2 (H+C), loo"), ("black-box", "zo (loo)"),
                        ("black-box", "ddpo (ddpo-pytorch settings)"), ("black-box", "grpo (flow-grpo settings)"),
                        ("black-box", "rlr f=0 h=2 (H+C), loo, cosine lr"),
                        ("black-box", "ddpo (ddpo-pytorch settings), cosine lr"),
                        ("differentiable", "rlr f=1 h=2, value (surrogate proxy)"), ("differentiable", "full_bp"),
                        ("differentiable", "ddpo (ddpo-pytorch settings)")))


def images_per_step(keys: dict) -> tuple[float, int]:
    """(images scored per cycle, optimizer steps per cycle) of a run: rlr_fast.costs for the estimate's
    own images; a DDPO (and GRPO) epoch scores its samples once for several steps; SQDF with a buffer scores its
    fresh chains every replay_ratio steps and a soft Q per replayed sample every step."""
    from rlr_fast.config import Config
    from rlr_fast.costs import work

    cfg = Config(**{k: v for k, v in keys.items() if k != "design_pilots"}) if keys["method"] != "auto" else None
    batch = keys["batch_size"] * keys.get("grad_accum", 1)
    if cfg is None:  # auto: as full_bp or rlr, one R(x0) per sample (its pilots are charged separately)
        return batch, 1
    if cfg.method in ("ddpo", "grpo"):
        return cfg.ddpo_rollout_batches * cfg.batch_size, cfg.ddpo_minibatches * cfg.ddpo_inner_epochs // cfg.grad_accum
    if cfg.method == "sqdf" and cfg.replay_capacity:
        return batch * (1 + cfg.replay_ratio), cfg.replay_ratio
    return batch * work(cfg.estimator_options(), cfg.num_steps).reward_images, 1


def steps_for(keys: dict, budget: int) -> int:
    """Optimizer steps whose images scored fit in `budget` (whole cycles; auto's pilots first)."""
    if keys["method"] == "auto":
        budget -= keys["design_pilots"] * keys["batch_size"]
    images, steps = images_per_step(keys)
    cycles = int(budget // images)
    if cycles < 1:
        raise ValueError(f"a budget of {budget} images is less than one cycle of {images:g} images")
    return cycles * steps


# ------------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    track: str
    label: str
    lr: float
    seed: int
    records: list[dict]
    wall_s: float  # the whole finetune call, model loading included
    cpu_s: float
    eval_mean: Optional[float] = None  # held-out reward of the final LoRA

    def to_json(self) -> dict:
        return dict(vars(self))


def run_one(args: tuple) -> RunResult:
    """finetune one (track, method, lr, seed) in a temporary folder; its per-step records and, for a
    figure run, the held-out reward of its final LoRA. A cached result (--cache) is read instead."""
    track_name, label, lr, seed, settings, evaluate, cache = args
    name = f"{track_name}|{label}|{lr:g}|{seed}|{evaluate}|{settings.budget}.json"
    path = None if cache is None else Path(cache) / name
    if path is not None and path.exists():
        return RunResult(**json.loads(path.read_text()))
    from rlr_fast import finetune
    from rlr_fast.inference import load_for_inference

    torch.set_num_threads(1)  # one core per worker
    track = TRACKS[track_name]
    keys = dict(settings.base, **track.methods[label])
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        start, cpu = time.perf_counter(), time.process_time()
        result = finetune("demo", out_dir=tmp, overwrite=True, reward=track.reward, lr=lr, seed=seed,
                          train_steps=steps_for(keys, settings.budget), sample_prompts=0, checkpoint_every=0,
                          tensorboard=False, **keys)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        eval_mean = None
        if evaluate:
            models = load_for_inference("default", str(result.out_dir), torch.device("cpu"), torch.float32)
            eval_mean = held_out_reward(models, settings, track.reward)
    run = RunResult(track_name, label, lr, seed, records, wall, cpu, eval_mean)
    if path is not None:
        path.write_text(json.dumps(run.to_json()))
    return run


# ------------------------------------------------------------------------------------------------
# Curves on a grid of images scored


@dataclass
class Curve:
    images: np.ndarray  # (points,) images scored
    reward: np.ndarray  # (points,) mean training reward of the steps ending in the trailing window
    unet: np.ndarray  # (points,) UNet forward-equivalents spent by then
    seconds: np.ndarray  # (points,) wall seconds of training steps by then


def curve(records: list[dict], grid: np.ndarray, window: int, backward_cost: float) -> Curve:
    """A run on the grid: at g images, the mean of the sampled rewards (`reward_mean`) of the steps that
    ended within (g - window, g] images, else of the last step before g (NaN before the first)."""
    images = np.cumsum([r["reward_images"] for r in records])
    unet = np.cumsum([r["unet_forward_samples"] + backward_cost * r["unet_backward_samples"] for r in records])
    seconds = np.cumsum([r["seconds"] for r in records])
    sampled = [(i, r["reward_mean"]) for i, r in enumerate(records) if r["reward_mean"] is not None]
    out = np.full((3, len(grid)), np.nan)
    reward = np.full(len(grid), np.nan)
    for p, g in enumerate(grid):
        done = [i for i in range(len(records)) if images[i] <= g]
        if done:
            out[:, p] = images[done[-1]], unet[done[-1]], seconds[done[-1]]
        before = [(i, v) for i, v in sampled if images[i] <= g]
        recent = [v for i, v in before if images[i] > g - window] or [v for _, v in before[-1:]]
        if recent:
            reward[p] = float(np.mean(recent))
    return Curve(grid, reward, out[1], out[2])


def mean_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis and its standard error (0 with one row)."""
    n = values.shape[0]
    se = values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), se


def first_reaching(images: np.ndarray, reward: np.ndarray, target: float) -> Optional[float]:
    hits = np.nonzero(reward >= target)[0]
    return float(images[hits[0]]) if hits.size else None


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


def held_out_reward(models, settings: Settings, reward: Callable) -> float:
    """Mean reward of `models` on the first `eval_prompts` demo prompts x `eval_seeds` (fixed noise)."""
    from rlr_fast.inference import generate_images
    from rlr_fast.presets import load_prompts

    prompts = load_prompts("demo")[:settings.eval_prompts]
    images = generate_images(models, models.encode_prompts(prompts), None, settings.eval_seeds,
                             num_steps=settings.base["num_steps"], eta=1.0, guidance_scale=1.0)
    return float(reward(images, prompts * len(settings.eval_seeds)).mean())  # seed-major


def base_reward(settings: Settings, reward: Callable) -> float:
    """The held-out reward of the model before fine-tuning (a fresh LoRA changes nothing)."""
    from rlr_fast.inference import load_for_inference

    with contextlib.redirect_stderr(io.StringIO()):
        return held_out_reward(load_for_inference("default", None, torch.device("cpu"), torch.float32), settings,
                               reward)


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
    tuning: dict = field(default_factory=dict)  # (track, label) -> {lr: score}
    short_tuning: dict = field(default_factory=dict)  # the long budget's: the short budget's tuning it started from
    chosen: dict = field(default_factory=dict)  # (track, label) -> lr
    interior: dict = field(default_factory=dict)  # (track, label) -> whether the chosen lr is interior
    runs: dict = field(default_factory=dict)  # (track, label) -> figure RunResults
    backward_cost: float = 0.0
    base_reward: dict = field(default_factory=dict)  # track -> held-out reward before fine-tuning
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of every run (the workers' processes), model loading included
    run_seconds: float = 0.0  # wall seconds of every run, read from the cache or not
    load: tuple = ()  # /proc/loadavg before and after


def tuning_score(records: list[dict], settings: Settings) -> float:
    """Mean training reward over the last quarter of the budget."""
    grid = np.arange(settings.bin, settings.budget + 1, settings.bin)
    return float(curve(records, grid, settings.budget // 4, 0.0).reward[-1])


def next_lrs(scores: dict, extensions_done: int, limit: int) -> list[float]:
    """The learning rates to try next: a factor of 3 beyond whichever edge of the grid is best."""
    lrs = sorted(scores)
    best = max(lrs, key=scores.get)
    if extensions_done >= limit or len(lrs) < 2:
        return []
    if best == lrs[-1]:
        return [lrs[-1] * 3]
    if best == lrs[0]:
        return [lrs[0] / 3]
    return []


def tune(study: Study, keys: list[tuple[str, str]], cache, s: Settings, start: dict) -> None:
    """Each method's lr at `s.budget`: its `start` grid, extended while the best is at an edge, scored on the
    tuning seeds; the scores, choices and whether each is interior go into the study."""
    pending, tuning = dict(start), {}
    for extension in range(s.extensions + 1):
        jobs = [(track, label, lr, seed, s, False, cache) for (track, label), lrs in pending.items()
                for lr in lrs for seed in s.tune_seeds]
        if not jobs:
            break
        for r in run_many(jobs, s.workers, f"tuning runs at {s.budget} images (round {extension + 1})"):
            study.cpu_seconds += r.cpu_s
            study.run_seconds += r.wall_s
            tuning.setdefault((r.track, r.label), {}).setdefault(r.lr, []).append(tuning_score(r.records, s))
        scores = {key: {lr: float(np.mean(v)) for lr, v in tuning[key].items()} for key in keys}
        pending = {key: next_lrs(scores[key], extension, s.extensions) for key in keys}
        pending = {key: lrs for key, lrs in pending.items() if lrs}
    study.tuning = {key: dict(sorted((lr, float(np.mean(v))) for lr, v in tuning[key].items())) for key in keys}
    for key, scores in study.tuning.items():
        lrs = sorted(scores)
        study.chosen[key] = max(lrs, key=scores.get)
        study.interior[key] = lrs[0] < study.chosen[key] < lrs[-1]


def run_study(settings: Settings, cache=None) -> Study:
    study = Study(settings, load=(_loadavg(),))
    start = time.perf_counter()
    study.backward_cost = backward_cost()
    study.base_reward = {t: base_reward(settings, TRACKS[t].reward) for t in settings.tracks}
    keys = [(t, label) for t in settings.tracks for label in TRACKS[t].methods
            if settings.methods is None or (t, label) in settings.methods]
    # the costliest runs first, so that the workers finish together
    keys.sort(key=lambda k: TRACKS[k[0]].methods[k[1]]["method"] in ("truncated_bp", "sqdf"))
    if len(settings.lrs) > 1 and settings.tune_seeds:
        tune(study, keys, cache, settings, {key: list(settings.lrs) for key in keys})
        if settings.figure_budget is not None:  # tuned again at the long budget, from the short budget's choice
            study.short_tuning = study.tuning
            from_short = {key: [study.chosen[key] / 3, study.chosen[key]] for key in keys}
            tune(study, keys, cache, settings.figures(), from_short)
    else:
        study.chosen = {key: settings.lrs[0] for key in keys}
        study.interior = {key: False for key in keys}
    jobs = [(t, label, study.chosen[(t, label)], seed, settings.figures(), True, cache) for t, label in keys
            for seed in settings.figure_seeds]
    for r in run_many(jobs, settings.workers, "figure runs"):
        study.cpu_seconds += r.cpu_s
        study.run_seconds += r.wall_s
        study.runs.setdefault((r.track, r.label), []).append(r)
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


def display_label(study: Study, key: tuple[str, str]) -> str:
    """The method's label; method=auto's carries the design it chose (each seed's, when they differ)."""
    track, label = key
    if TRACKS[track].methods[label]["method"] != "auto":
        return label
    chosen = sorted({r.records[0].get("design", {}).get("label", "?") for r in study.runs[key]})
    return f"auto (chose {' / '.join(chosen)})"


def _with_se(name: str, values) -> dict:
    mean, se = mean_se(np.asarray(values, dtype=float)[:, None])
    return {name: float(mean[0]), f"{name}_se": float(se[0])}


def summarise(study: Study, track: str) -> tuple[list[dict], dict, dict]:
    """Table rows of a track (one per method), its mean curves (label -> arrays), and the goal's numbers."""
    s = study.settings.figures()
    grid = np.arange(s.bin, s.budget + 1, s.bin)
    window = max(s.bin, s.budget // 6)
    keys = [(track, label) for label in TRACKS[track].methods if (track, label) in study.runs]
    curves = {k: [curve(r.records, grid, window, study.backward_cost) for r in study.runs[k]] for k in keys}
    mean_curves = {}
    for k, cs in curves.items():
        reward, se = mean_se(np.stack([c.reward for c in cs]))
        with warnings.catch_warnings():  # a grid point before every seed's first step stays NaN, not drawn
            warnings.simplefilter("ignore", RuntimeWarning)
            unet, seconds = (np.nanmean([getattr(c, a) for c in cs], axis=0) for a in ("unet", "seconds"))
        mean_curves[k] = dict(images=grid, reward=reward, se=se, unet=unet, seconds=seconds)
    final = {k: np.array([c.reward[-1] for c in cs]) for k, cs in curves.items()}
    ddpo_key = next(k for k in keys if TRACKS[track].methods[k[1]] == DDPO)  # as ddpo-pytorch runs it: the reference
    ddpo_final = float(final[ddpo_key].mean())
    rows = []
    for k in keys:
        runs, mc = study.runs[k], mean_curves[k]
        per_seed = [first_reaching(grid, c.reward, ddpo_final) for c in curves[k]]
        reached = [v for v in per_seed if v is not None]
        spent = np.array([sum(r["reward_images"] for r in run.records) for run in runs])
        unet = np.array([c.unet[-1] for c in curves[k]])
        seconds = np.array([sum(r["seconds"] for r in run.records) for run in runs])
        off_policy = [r["estimator"]["clip_fraction"] for run in runs for r in run.records
                      if "clip_fraction" in r["estimator"] and not r["reward_images"]]
        rows.append({
            "method": display_label(study, k), "lr": study.chosen[k], "lr_interior": study.interior[k],
            **_with_se("final_reward", final[k]), **_with_se("held_out_reward", [r.eval_mean for r in runs]),
            "images_to_ddpo_final": first_reaching(grid, mc["reward"], ddpo_final),
            "seeds_reaching": f"{len(reached)}/{len(per_seed)}",
            "per_seed_min": min(reached) if reached else None, "per_seed_max": max(reached) if reached else None,
            "images_scored": float(spent.mean()),
            "unet_fwd_equiv_per_image": float(np.mean(unet / spent)),
            "train_wall_s_per_image": float(np.mean(seconds / spent)),
            "wall_s_per_run": float(np.mean([r.wall_s for r in runs])),
            "cpu_s_per_run": float(np.mean([r.cpu_s for r in runs])),
            "clip_fraction_off_policy": float(np.mean(off_policy)) if off_policy else None,
        })
    rlr = [r for r, k in zip(rows, keys) if unbiased_rlr(TRACKS[track].methods[k[1]])]
    reaching = [r for r in rlr if r["images_to_ddpo_final"] is not None]
    # the variant that reaches DDPO's final first (ties: the higher final), else the highest final
    best = (min(reaching, key=lambda r: (r["images_to_ddpo_final"], -r["final_reward"])) if reaching
            else max(rlr, key=lambda r: r["final_reward"]))
    goal = dict(track=track, ddpo_final=ddpo_final, window=window, best_rlr=best["method"],
                best_rlr_images=best["images_to_ddpo_final"], best_rlr_final=best["final_reward"],
                budget=s.budget, half=best["images_to_ddpo_final"] is not None and
                2 * best["images_to_ddpo_final"] <= s.budget, above=best["final_reward"] > ddpo_final)
    goal["met"] = goal["half"] and goal["above"]
    return rows, {display_label(study, k): v for k, v in mean_curves.items()}, goal


# ------------------------------------------------------------------------------------------------
# Files


def _cell(value, column: str = "", digits: int = 4) -> str:
    if value is None:
        return "not reached" if column.startswith("images_to") else ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_cell(r[c], c) for c in columns) + " |" for r in rows])


def goal_line(goal: dict) -> str:
    images = goal["best_rlr_images"]
    reached = (f"reaches DDPO's final reward ({goal['ddpo_final']:.4g}) after {images:g} of {goal['budget']} images "
               f"({images / goal['budget']:.2f} of DDPO's)" if images is not None else
               f"does not reach DDPO's final reward ({goal['ddpo_final']:.4g}) within {goal['budget']} images")
    name = "Goal" if goal["track"] == "black-box" else "The goal's comparison on this track (set on black-box)"
    return (f"{name} (the best unbiased RLR variant reaches DDPO's final reward with at most half of DDPO's images and "
            f"ends above it): {'met' if goal['met'] else 'NOT met'}. Best unbiased RLR variant: {goal['best_rlr']}: "
            f"it {reached}; its final reward {goal['best_rlr_final']:.4g} is "
            f"{'above' if goal['above'] else 'not above'} DDPO's.")


def header(study: Study, command: str) -> list[str]:
    s = study.settings
    device = current_device(force_cpu=True)
    return [
        "# Sample efficiency: reward against images scored, on a black-box and a differentiable reward", "",
        f"Command: `{command}`. Device: {device.name}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. {s.workers} worker process(es), one thread each. The runs "
        f"(tuning and figures, whether run now or read from --cache): {study.cpu_seconds / 60:.1f} CPU min, "
        f"{study.run_seconds / 60:.1f} wall min summed over runs; this invocation's wall clock "
        f"{study.seconds / 60:.1f} min. Load average (1, 5, "
        f"15 min) at the start: {study.load[0]}; at the end: {study.load[-1]}"
        + (" -- the machine was shared, so wall times are contended (CPU seconds are less so)."
           if _contended(study.load, s.workers) else "."), "",
        f"Setting: `finetune` on the embedded default model (latent 4 x 8 x 8), T = {s.base['num_steps']}, eta = 1, "
        f"batches of {s.base['batch_size']} ({s.base['images_per_prompt']} images per prompt), LoRA rank 4, AdamW, "
        f"clip 1. Budget: {s.figures().budget} images scored per figure run (`reward_images`: every image the reward "
        f"scored, value-baseline proxies and auto's pilots included). Learning rate: the best of the grid "
        f"{list(s.lrs)} "
        f"extended by factors of 3 while the best was at an edge (at most {s.extensions} times), on tuning seeds "
        f"{list(s.tune_seeds)} at {s.budget} images (score: mean training reward over the last quarter of the budget)"
        + ("" if s.figure_budget is None else f", then again at {s.figure_budget} images from the short budget's "
           "choice and a third of it, extended the same way")
        + f"; figures: seeds "
        f"{list(s.figure_seeds)}, mean +- standard error.", "",
        f"DDPO: {DDPO['ddpo_rollout_batches']} rollout batches per epoch, {DDPO['ddpo_minibatches']} minibatches, "
        f"{DDPO['ddpo_inner_epochs']} pass, clip range {DDPO['clip_range']:g} on per-element-mean log-probabilities "
        f"(ddpo-pytorch's units), advantages clipped at {DDPO['ddpo_adv_clip']:g}, per-prompt statistics from "
        f"{DDPO['ddpo_min_count']} rewards (16 prompts: on after ~{16 * DDPO['ddpo_min_count']} images).", "",
        "Columns: final_reward = the seed's mean training reward over the last window of the budget; "
        "held_out_reward = the final LoRA on held-out noise; images_to_ddpo_final = the first grid point at which "
        "the seed-mean smoothed reward reaches DDPO's final reward, seeds_reaching / per_seed_min / per_seed_max "
        "the same per seed; unet_fwd_equiv_per_image = UNet forward-equivalents (a backward counted as "
        f"{study.backward_cost:.3f} forwards, FLOPs measured on the model) per image scored; "
        "train_wall_s_per_image = wall seconds of training steps per image scored; wall/cpu_s_per_run = one whole "
        "run, model loading and held-out evaluation included; lr_interior = a larger and a smaller lr both scored "
        "worse.", "",
    ]


def _scores(scores: dict) -> str:
    return ", ".join(f"lr {lr:g}: {v:.4g}" for lr, v in scores.items())


def write(study: Study, summaries: dict, out: Path, command: str) -> list[Path]:
    """<out>/sample_efficiency.md (protocol, a table and a goal line per track), .csv (every figure run's
    curve) and .png (per track: reward against images, UNet work and wall time)."""
    s = study.settings.figures()
    out.mkdir(parents=True, exist_ok=True)
    stem = "sample_efficiency" if study.settings.figure_budget is None else "sample_efficiency_long"
    md, csv_path, png = out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.png"
    lines = header(study, command)
    for track, (rows, _, goal) in summaries.items():
        lines += [f"## {track} track: {TRACKS[track].why}", "", *_table(rows), "", goal_line(goal), "",
                  "Tuning scores (tuning seeds' mean):", ""]
        for (t, label), scores in study.tuning.items():
            if t == track:
                short = study.short_tuning.get((t, label))
                lines.append(f"- {label}: {_scores(scores)}"
                             + ("" if short is None else f" (at the short budget: {_scores(short)})"))
        lines.append("")
    md.write_text("\n".join(lines) + "\n")
    window = max(s.bin, s.budget // 6)
    grid = np.arange(s.bin, s.budget + 1, s.bin)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["track", "method", "lr", "seed", "images", "reward", "unet_fwd_equiv", "wall_s"])
        for (track, label), runs in study.runs.items():
            for r in runs:
                c = curve(r.records, grid, window, study.backward_cost)
                writer.writerows([track, label, f"{r.lr:g}", r.seed, int(g), f"{v:.6g}", f"{u:.6g}", f"{sec:.4g}"]
                                 for g, v, u, sec in zip(c.images, c.reward, c.unet, c.seconds))
    panels = []
    for track, (_, mean_curves, _) in summaries.items():
        series = {axis: [Series(label, mc[axis], mc["reward"], mc["se"]) for label, mc in mean_curves.items()]
                  for axis in ("images", "unet", "seconds")}
        panels += [Panel(f"{track}: reward vs images scored", "images scored", "reward", series["images"]),
                   Panel(f"{track}: reward vs UNet work", "UNet forward-equivalents", "reward", series["unet"]),
                   Panel(f"{track}: reward vs wall time", "wall seconds of training steps", "reward",
                         series["seconds"])]
    draw_panels(png, panels, title=f"mean +- s.e. over seeds {list(s.figure_seeds)}; "
                                   f"{current_device(force_cpu=True).name}, {datetime.date.today().isoformat()}")
    return [md, csv_path, png]


def _contended(loads: tuple, workers: int) -> bool:
    """A 1-minute load average above this run's own workers at either end means others were running."""
    values = [float(v.split()[0]) for v in loads if v != "unknown"]
    return any(v > workers + 0.5 for v in values)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, written to a temporary folder (or --out): the suite's smoke test")
    parser.add_argument("--long", action="store_true",
                        help=f"the main contests at {LONG.figure_budget} images ("
                             + "; ".join(f"{t}: {' / '.join(m for u, m in LONG.methods if u == t)}" for t in TRACKS)
                             + "), each lr tuned again there from the short budget's choice: "
                             "sample_efficiency_long.{md,csv,png}")
    parser.add_argument("--out", type=Path, default=None, help="folder for the three result files")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 2; --quick: 1)")
    parser.add_argument("--tracks", nargs="+", choices=list(TRACKS), default=None, help="run these tracks only")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep each run's records here and reuse them (an interrupted study resumes)")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/sample_efficiency.py", *(argv if argv is not None else sys.argv[1:])])
    if args.quick and args.long:
        parser.error("--quick and --long are different sizes: give one")
    settings = QUICK if args.quick else LONG if args.long else FULL
    if args.workers is not None:
        settings = replace(settings, workers=args.workers)
    if args.tracks is not None:
        settings = replace(settings, tracks=tuple(args.tracks))
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    study = run_study(settings, args.cache)
    summaries = {track: summarise(study, track) for track in settings.tracks}
    out = args.out or (Path(tempfile.mkdtemp(prefix="sample_efficiency_")) if args.quick else RESULTS)
    paths = write(study, summaries, out, command)
    for track, (rows, _, goal) in summaries.items():
        for row in rows:
            print(track, ", ".join(f"{k}={_cell(v, k)}" for k, v in row.items()))
        print(goal_line(goal))
    print(f"wrote {', '.join(str(p) for p in paths)}; {study.seconds / 60:.1f} min wall, "
          f"{study.cpu_seconds / 60:.1f} CPU min in the runs")
    return dict(study=study, summaries=summaries, paths=paths)


if __name__ == "__main__":
    main()
