"""The fine-tuning loop: `finetune(config) -> Result`.

One update:

    x_T -> rollout (no grad) -> reward via the VAE -> estimate(...) accumulates .grad
        -> (grad accumulation) -> clip -> AdamW with warm-up -> log, sample grid, checkpoint

The loop does not know which method it runs: the run's StepMethod (rlr_fast.update) makes each
step's gradient and may take several steps per sampled batch (ddpo), keeping a state that is
committed with each step and stored in checkpoints.

Everything random draws from two CPU generators seeded by `config.seed` (one for prompts and
sampling noise, one for the estimator's j and subsampling), so a run is reproducible and a
checkpoint that stores their states (and every global RNG) resumes bit-exactly on the CPU.

Launched by torchrun, the run is data parallel (rlr_fast.distributed): each rank rolls out its
share of every micro-batch, and rank 0 alone writes the out_dir. The same config gives the same
run at any world size (up to floating-point rounding), and resumes at any world size that divides
batch_size (bit-exactly on the CPU at the world size that wrote the checkpoint).

A run checks everything it can (config, device, prompts, model folder, resume checkpoint, out_dir)
before it writes anything, holds its out_dir's lock while it runs, and loads reward and model before
it changes the out_dir (only a folder it marked as its own: rlr_fast.run_dir). Ctrl-C and SIGTERM
abandon the step in progress (or finish one being committed), write a checkpoint and say how to
resume; a write that fails stops the run with a WriteError after a checkpoint. A resume from an
earlier checkpoint than the newest starts a branch (the later outputs move to superseded/); a
resume of a complete run says so and returns.

Files in `out_dir` (rlr_fast.run_dir keeps them safe):
    .rlr_fast_run                      the mark of a run's folder
    config.yaml                        the resolved config
    metrics.jsonl                      one JSON object per optimizer step (rlr_fast.metrics)
    samples/step_NNNNNN.png            sample grids: fixed prompts (rows) x fixed seeds (columns); .gif for videos
    checkpoints/step_NNNNNN.safetensors   LoRA, optimizer, RNG states, step, config, counters (the current
                                       estimator design with method=auto) and metrics records (rlr_fast.checkpoint);
                                       the newest keep_checkpoints are kept
    checkpoints/state_NNNNNN.safetensors  SQDF's replay buffer, beside the newest checkpoint only
    superseded/from_step_NNNNNN/       what a branch started at that step moved aside
    designs/step_NNNNNN.md, .png       method=auto: each design's report (rlr_fast.design)
    pytorch_lora_weights.safetensors   the final LoRA (StableDiffusionPipeline.load_lora_weights)
    reward_curve.png, summary.json     the reward per step, and the run's final numbers
    eval.jsonl, eval_curve.png         with eval_every: LoRA vs base model every N steps (rlr_fast.evaluation)
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import (Checkpoint, capture_rng, check_compatible, find_checkpoint, meta_checksum,
                         prune_checkpoints, restore_checkpoint, restore_rng, save_checkpoint)
from .config import Config, load_config
from .consistency import load_consistency
from .presets import PRESETS, load_prompts
from .design import Design
from .distributed import RankFailure, Ranks, process_group
from .evaluation import RunEvaluation
from .inference import (DTYPES, check_model, generate_images, load_models, progress, prompt_rows, resolve_device,
                        save_grid)
from .metrics import MetricsLog, draw_reward_curve, jsonable, peak_memory_bytes, resume_records, summarize
from .models import SDModels
from .lora import LORA_WEIGHT_NAME, add_lora, lora_parameters, lora_step, save_lora
from .profiling import enable_profiling, nvtx_range
from .rewards import Reward, get_reward, get_video_reward
from .run_dir import RunLock, WriteError, atomic_write, check_out_dir, clear_leftovers, start_afresh, supersede
from .options import AUTO
from .prompts import PromptBank, PromptSchedule
from .methods import step_method
from .update import StepContext, StepMethod, TrainingRollout, apply, design_estimator
from .video import check_num_frames, is_video_model, is_video_unet


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped for a NaN/Inf reward or gradient."""


class StopRequested(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Result:
    """Where a run's outputs are and how it ended."""

    out_dir: Path
    lora_path: Path
    config_path: Path
    metrics_path: Path
    curve_path: Path
    checkpoint_path: Path
    grid_paths: list[Path] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # summary: see `summarize`


# ----------------------------------------------------------------------------------------------
# Setup


def _resolve_config(config, overrides: dict) -> tuple[Config, Optional[Checkpoint]]:
    """`config` (a Config, a preset name or a YAML path; None: the demo preset, or when resuming
    the checkpoint's config) with `overrides` applied, and the verified checkpoint to resume."""
    if isinstance(config, (str, Path)):
        config = Config.from_preset(str(config)) if str(config) in PRESETS else load_config(path=config)
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a Config, a preset name or a YAML path, got {type(config).__name__}")
    resume = overrides.get("resume", config.resume if config is not None else None)
    checkpoint = find_checkpoint(resume) if resume is not None else None
    if config is None:
        config = (Config.from_preset("demo") if checkpoint is None else
                  Config().with_overrides(checkpoint.config, validate=False))
    config = config.with_overrides(overrides, merge=True)  # reward_kwargs={clip_path: ...} keeps the dtype
    config.check_used(overrides)  # finetune(method="ddpo", baseline="value"): one line, not a dropped option
    if checkpoint is not None:
        if "out_dir" in overrides and Path(overrides["out_dir"]).resolve() != checkpoint.run.resolve():
            raise ValueError(f"out_dir={overrides['out_dir']!r} is not the folder of the run resumed "
                             f"({checkpoint.run}): a run continues in its own folder (copy that folder to continue it "
                             "elsewhere)")
        if config.train_steps < checkpoint.step:
            raise ValueError(f"train_steps={config.train_steps} is below the step of {checkpoint.path} "
                             f"({checkpoint.step}): set train_steps >= {checkpoint.step} (to go on from an earlier "
                             "step, resume its checkpoint file)")
    return config, checkpoint


def load_reward(cfg: Config, device: torch.device) -> Reward:
    """The configured reward, on `device`; checks that it suits the estimator."""
    load = get_video_reward if is_video_model(cfg.model, cfg.motion_adapter) else get_reward
    reward = load(cfg.reward, **cfg.reward_kwargs).to(device)
    needs_dr = cfg.method in ("full_bp", "truncated_bp", "sqdf") or (cfg.method == "rlr" and cfg.first_order_steps > 0)
    if needs_dr and not reward.differentiable:
        raise ValueError(f"reward {cfg.reward!r} is not differentiable, but method={cfg.method!r} "
                         f"(first_order_steps={cfg.first_order_steps}) needs dR/dx0; use method='zo' or 'ddpo', "
                         "or method='rlr' with first_order_steps=0")
    return reward


def plan_memory(cfg: Config, world: int = 1) -> tuple[Config, str]:
    """`cfg` with the memory options `rlr_fast.plan` chooses to fit `max_memory_gb` (for the
    architectures in cfg.model's folder) on each of `world` ranks, each rolling out batch_size /
    world samples; and the plan's table. A budget nothing fits is a ValueError (plan.PlanError)."""
    from .plan import plan

    chosen = plan(cfg, ranks=world)  # the global config, validated as it is; the plan is one rank's
    return cfg.with_overrides(chosen.config_overrides()), chosen.table()


class StopSignals:
    """While entered, SIGINT and SIGTERM raise StopRequested at once, or, inside `deferred()` (an
    update being committed), when it ends: a checkpoint never holds half of a step. Signal handlers
    can only be set in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.deferring, self.pending, self.previous = False, None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.deferring:
            self.pending = signum
        else:
            raise StopRequested(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise StopRequested(signum)


# ----------------------------------------------------------------------------------------------
# The run


def finetune(config: Config | str | None = None, *, callback: Optional[Callable[[int, dict], None]] = None,
             **overrides) -> Result:
    """Fine-tune a LoRA on the UNet to raise a reward; returns where the outputs are.

    `config`: a Config, a preset name or a YAML path; None runs the `demo` preset (or, with
    `resume=`, the resumed run's config). `overrides` set config keys (`finetune(lr=1e-3)`).
    `callback(step, metrics)` runs after every optimizer step (on every rank of a torchrun launch).
    Ctrl-C or SIGTERM writes a checkpoint and raises StopRequested (a KeyboardInterrupt);
    `resume=out_dir` continues from it (a run that is complete says so and returns). Under
    torchrun, a rank that dies makes the others raise RankFailure after rank 0 wrote a checkpoint of
    the last step all ranks completed. A write that fails raises WriteError after a checkpoint.
    """
    cfg, checkpoint = _resolve_config(config, overrides)
    device, cfg = resolve_device(cfg)
    with process_group(device, cfg.distributed_timeout) as (ranks, device):
        ranks.share(cfg.batch_size)  # a batch the ranks cannot split is refused before anything loads
        records, damaged_records = [], False
        if checkpoint is not None:
            check_compatible(checkpoint.config, cfg, checkpoint.path)
            ranks.agree(f"{checkpoint.path.name} ({meta_checksum(checkpoint.meta)})", "checkpoints to resume")
            cfg = cfg.with_overrides({"out_dir": str(checkpoint.run)})  # continue in the run's folder
            if ranks.main:
                records, damaged_records = resume_records(checkpoint.run / "metrics.jsonl", checkpoint.step,
                                                          checkpoint.records(), checkpoint.path)
        prompts = load_prompts(cfg.prompts)
        if cfg.prompt_schedule is not None:  # its keys must be prompts of the set
            PromptSchedule.load(cfg.prompt_schedule).check(cfg.num_steps, prompts)
        for note in cfg.notices() if ranks.main else ():
            print(note, file=sys.stderr)
        check_model(cfg.model, cfg.motion_adapter)  # before the reward's weights load: a wrong model path shows at once
        out = Path(cfg.out_dir)
        with contextlib.ExitStack() as held:
            def claim_out_dir():
                check_out_dir(out, resuming=checkpoint is not None, overwrite=cfg.overwrite)
                held.enter_context(RunLock(out))

            ranks.first_on_main(claim_out_dir, "checking the out_dir")  # rank 0's refusal stops every rank
            if checkpoint is not None and _is_complete(out, checkpoint, cfg):
                return _complete(out, checkpoint, records if damaged_records else None, ranks)
            stops = held.enter_context(StopSignals())
            run = _load(cfg, device, checkpoint, prompts, out, ranks)
            return _train(run, records, checkpoint is not None, stops, callback)


def _is_complete(out: Path, checkpoint: Checkpoint, cfg: Config) -> bool:
    """Whether the run in `out` ended at `checkpoint`: train_steps reached and its final LoRA and
    summary written for that step. A damaged final LoRA is said, and then the run is not complete."""
    if checkpoint.step < cfg.train_steps:
        return False
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        ended = summary["last"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        lora = lora_step(out / LORA_WEIGHT_NAME)
    except OSError:
        return False
    except ValueError as e:
        print(f"{e}. Writing the run's final outputs again from {checkpoint.path}", file=sys.stderr)
        return False
    return ended == checkpoint.step and lora in (None, checkpoint.step)


def _complete(out: Path, checkpoint: Checkpoint, repaired: Optional[list[dict]], ranks: Ranks) -> Result:
    """The Result of a complete run, resumed: nothing loads or is written but a damaged metrics.jsonl,
    rebuilt from the checkpoint (`repaired`)."""
    if ranks.main:
        if repaired is not None:
            MetricsLog(out, repaired, tensorboard=False).close()
        print(f"{out} is complete: it trained all {checkpoint.step} steps and wrote its final outputs; nothing to do. "
              f"To train longer: rlr-fast finetune --resume {out} --set train_steps=N (N > {checkpoint.step})",
              file=sys.stderr)
    return Result(out_dir=out, lora_path=out / LORA_WEIGHT_NAME, config_path=out / "config.yaml",
                  metrics_path=out / "metrics.jsonl", curve_path=out / "reward_curve.png",
                  checkpoint_path=checkpoint.path, grid_paths=sorted((out / "samples").glob("step_*")),
                  metrics=json.loads((out / "summary.json").read_text(encoding="utf-8")))


@dataclass
class _Run:
    """What a run trains with: loaded and checked before its out_dir changes."""

    cfg: Config
    out: Path
    device: torch.device
    models: SDModels
    reward: Reward
    bank: PromptBank
    params: list
    optimizer: torch.optim.Optimizer
    generators: dict
    method: StepMethod
    method_state: object  # the method's state as of the last committed step
    start: int
    counters: dict
    plan_table: Optional[str]
    evaluation: Optional[RunEvaluation] = None
    ranks: Ranks = field(default_factory=Ranks)
    grids: list[Path] = field(default_factory=list)
    step: int = 0  # the last committed step
    rng: dict = field(default_factory=dict)  # every RNG's state after it
    checkpointed: Optional[int] = None  # the step of the newest checkpoint

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype]

    @property
    def rollout(self) -> TrainingRollout:
        return self.method.ctx.rollout

    def sample_grid(self, step: int) -> None:
        """samples/step_NNNNNN.png (.gif for videos; rank 0 draws it): the first `sample_prompts` prompts
        (rows) x `sample_seeds` (columns)."""
        cfg, prompts = self.cfg, min(self.cfg.sample_prompts, len(self.bank.prompts))
        if not prompts or not cfg.sample_seeds or not self.ranks.main:
            return
        cond = self.bank.conditioning(torch.arange(prompts))  # under the prompt schedule when there is one
        with nvtx_range("sample grid"):
            images = generate_images(self.models, cond["encoder_hidden_states"], self.bank.negative, cfg.sample_seeds,
                                     num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                     dtype=self.dtype, desc=f"sample grid (step {step})",
                                     latent_hw=self.models.latent_hw(cfg.resolution),
                                     prompt_index=cond.get("prompt_index"), num_frames=cfg.num_frames)
        suffix = "gif" if images.dim() == 5 else "png"
        self.grids.append(save_grid(prompt_rows(images, len(cfg.sample_seeds)), prompts,
                                    self.out / "samples" / f"step_{step:06d}.{suffix}"))

    def step_config(self, step: int) -> tuple[Config, Optional[Design]]:
        """The config update `step` runs: with method='auto', the current design applied, and a new design
        (from pilot batches) at the first update and every design_every updates; a new one is kept only
        when its update commits (`commit_design`), so a stopped step designs again on resume."""
        cfg = self.cfg
        if cfg.method != AUTO:
            return cfg, None
        designed = None
        if "design" not in self.counters or (cfg.design_every and step % cfg.design_every == 0):
            designed = design_estimator(cfg, self.models, self.bank, self.reward, self.rollout,
                                        self.generators["design"], self.device, self.dtype)
            # every rank designs from the same pilots (its "design" generator and LoRA are the same everywhere)
            self.ranks.agree(json.dumps(jsonable(designed.config_overrides()), sort_keys=True), "estimator designs",
                             hint="the same pilots should give the same design; rerun with a fixed method")
        return cfg.with_overrides(designed.config_overrides() if designed else self.counters["design"]), designed

    def commit_design(self, designed: Design) -> dict:
        """Keep a design made for this update (in the counters, so checkpoints carry it); returns its
        metrics entry. Its report is written by `save_design`."""
        self.counters["design"] = jsonable(designed.config_overrides())
        self.counters["designs"] = self.counters.get("designs", 0) + 1
        self.counters["design_forward_equivalents"] = (self.counters.get("design_forward_equivalents", 0.0)
                                                      + designed.pilot_cost["forward_equivalents"])
        return jsonable(designed.summary())

    def save_design(self, step: int, designed: Design) -> None:
        """designs/step_NNNNNN.md and .png: the report of the design update `step` ran with."""
        if self.ranks.main:
            designed.save(self.out / "designs", f"step_{step:06d}")

    def evaluate(self, step: int, last: bool = False) -> None:
        """The eval_every evaluation at `step` when one is due there (RunEvaluation says when)."""
        if self.evaluation is not None:
            with nvtx_range("evaluation"):
                self.evaluation(step, last)

    def checkpoint(self, records: list[dict]) -> Path:
        """checkpoints/step_NNNNNN.safetensors of the last committed step with the metrics `records`,
        written by rank 0 (the state is the same on every rank), then all but the newest
        keep_checkpoints deleted."""
        path = self.out / "checkpoints" / f"step_{self.step:06d}.safetensors"
        if self.ranks.main:
            save_checkpoint(path, step=self.step, cfg=self.cfg.as_run(), unet=self.models.unet,
                            optimizer=self.optimizer, rng=self.rng, counters=self.counters,
                            method_state=self.method_state, world_size=self.ranks.world, records=records)
            prune_checkpoints(path.parent, self.cfg.keep_checkpoints)
        self.checkpointed = self.step
        return path

    def write_failed(self, failed: WriteError, records: list[dict]) -> WriteError:
        """`failed` with what became of the trained steps: a checkpoint of the last committed step is
        tried first (unless there is one)."""
        step, out = self.step, self.out
        if self.checkpointed == step:
            kept = f"the checkpoint of step {step} is in {out / 'checkpoints'}"
        elif step == 0:
            return WriteError(failed.path, failed.error, "no step was trained; start the run again once the disk is "
                                                         "fixed (or free space)")
        else:
            try:
                kept = f"checkpoint written to {self.checkpoint(records)}"
            except WriteError as again:
                kept = (f"the checkpoint of step {step} could not be written either ({again.error.strerror}): the "
                        f"steps after the newest checkpoint in {out / 'checkpoints'} are lost")
        return WriteError(failed.path, failed.error, f"stopped after step {step}/{self.cfg.train_steps}; {kept}. "
                                                     f"Once the disk is fixed (or has free space), resume with: "
                                                     f"rlr-fast finetune --resume {out}")


def _load(cfg: Config, device: torch.device, checkpoint: Optional[Checkpoint], prompts: list[str], out: Path,
          ranks: Ranks) -> _Run:
    """Reward, model, LoRA, optimizer and RNGs of a run (restored from `checkpoint` when resuming);
    the LoRA is rank 0's on every rank."""
    reward = load_reward(cfg, device)
    if cfg.profile:  # ranges here and inside estimate; profiling may also be on from RLR_FAST_PROFILE=1
        enable_profiling(True)
    models = load_models(cfg.model, device, DTYPES[cfg.dtype], cfg.motion_adapter)
    models.set_resolution(cfg.resolution)  # a size the model cannot take stops here; SDXL's time ids follow it
    if is_video_unet(models.unet):
        check_num_frames(models.unet, cfg.num_frames)
    plan_table = None
    if cfg.max_memory_gb is not None and cfg.method != AUTO:  # auto: rlr_fast.design plans each design it weighs
        cfg, plan_table = plan_memory(cfg, ranks.world)
    add_lora(models.unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    if cfg.method == "sqdf" and cfg.x0_estimator == "consistency":  # a second, frozen adapter (or UNet)
        load_consistency(models.unet, cfg.consistency_model, models.scheduler, steps=cfg.consistency_steps,
                         guidance=cfg.consistency_guidance)
    params = lora_parameters(models.unet)
    for p in params:  # LoRA weights and AdamW state in fp32 whatever the frozen weights' dtype (fp64 runs: fp64)
        p.data = p.data.to(torch.promote_types(DTYPES[cfg.dtype], torch.float32))
    bank = PromptBank(models, prompts, cfg.negative_prompt, cfg.prompt_schedule, cfg.num_steps)
    # encodes its prompts (before free_text_encoder); rank 0 alone evaluates, the others wait for it at
    # the next collective (within distributed_timeout)
    evaluation = RunEvaluation(cfg, models, reward, device) if cfg.eval_every and ranks.main else None
    if cfg.free_text_encoder:
        models.free_text_encoders()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    generators = {"sampling": torch.Generator().manual_seed(cfg.seed),
                  "estimator": torch.Generator().manual_seed(cfg.seed + 1)}
    if cfg.method == AUTO:  # pilot batches: the training batches stay those of a fixed method
        generators["design"] = torch.Generator().manual_seed(cfg.seed + 2)
    method = step_method(StepContext(cfg, models, bank, reward, TrainingRollout(cfg, models, device), params,
                                     generators, device, DTYPES[cfg.dtype], ranks))
    start, counters, state = 0, {"consecutive_nonfinite": 0, "seconds": 0.0}, method.initial_state()
    checkpointed = None
    if checkpoint is not None:
        restore_rng(restore_checkpoint(checkpoint, models.unet, optimizer), generators)
        start, counters, checkpointed = checkpoint.step, checkpoint.meta["counters"], checkpoint.step
        if checkpoint.method_state() is not None:
            state = method.load_state(*checkpoint.method_state())
        if ranks.main:
            written = checkpoint.meta.get("world_size", 1)
            print(f"resuming {out} at step {start} from {checkpoint.path}" + (
                f" (written by {written} ranks, continued by {ranks.world}: the same batches, equal up to "
                "floating-point rounding)" if written != ranks.world else ""), file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
    ranks.broadcast_parameters(params)
    return _Run(cfg=cfg, out=out, device=device, models=models, reward=reward, bank=bank, params=params,
                optimizer=optimizer, generators=generators, method=method, method_state=state, start=start,
                counters=counters, plan_table=plan_table, evaluation=evaluation, ranks=ranks, step=start,
                rng=capture_rng(generators), checkpointed=checkpointed)


def _prepare_out_dir(run: _Run, resumed: bool) -> None:
    """The out_dir's first changes (rank 0), once everything is loaded and checked: a fresh run clears
    an earlier run's outputs and marks the folder; a resumed one moves aside what is of later steps
    than its checkpoint (a branch); then the leftovers of killed writes go, and the config is written."""
    out, cfg = run.out, run.cfg
    if not resumed:
        start_afresh(out)
    else:
        moved = supersede(out, run.start, _final_step(out))
        if moved is not None:
            print(f"resuming at step {run.start}, before the run's later outputs: moved them (and a copy of "
                  f"metrics.jsonl) to {moved}", file=sys.stderr)
    clear_leftovers(out)
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(cfg.as_run().to_yaml(), encoding="utf-8"))
    if run.plan_table is not None:
        atomic_write(out / "memory_plan.md", lambda tmp: tmp.write_text(run.plan_table, encoding="utf-8"))
        print(f"memory plan for max_memory_gb={cfg.max_memory_gb} (in {out / 'memory_plan.md'}):\n{run.plan_table}",
              file=sys.stderr)


def _final_step(out: Path) -> Optional[int]:
    """The step the run's final outputs (LoRA, summary) in `out` are of, None when it has none."""
    steps = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        steps.append(json.loads((out / "summary.json").read_text(encoding="utf-8"))["last"]["step"])
    with contextlib.suppress(OSError, ValueError):
        steps.append(lora_step(out / LORA_WEIGHT_NAME))
    return max((s for s in steps if isinstance(s, int)), default=None)


def _train(run: _Run, records: list[dict], resumed: bool, stops: StopSignals, callback) -> Result:
    """The loop, from the run's start to `train_steps`, and the run's final outputs (rank 0 writes).
    A write that fails stops the run with a WriteError, after a checkpoint."""
    log = MetricsLog(run.out, [], tensorboard=False, write=False)
    try:
        if run.ranks.main:  # everything is loaded and checked: only now does the out_dir change
            _prepare_out_dir(run, resumed)
        log = MetricsLog(run.out, records, tensorboard=run.cfg.tensorboard, write=run.ranks.main)
        if run.evaluation is not None:
            run.evaluation.start(run.out, run.start)
        if not resumed:
            run.sample_grid(0)
        run.evaluate(run.start)
        t_session = time.perf_counter()
        stopped = _loop(run, log, stops, callback)
        return _finish(run, log, stopped, stops, t_session)
    except WriteError as failed:
        with stops.deferred():
            raise run.write_failed(failed, log.records) from None
    finally:
        log.close()


def _stop_reason(stop: BaseException) -> str:
    return (f"stopped by {stop}" if isinstance(stop, StopRequested) else "interrupted"
            if isinstance(stop, KeyboardInterrupt) else "another rank failed")


def _resume_hint(out: Path) -> str:
    return (f"Resume with: rlr-fast finetune --resume {out}   (Python: rlr_fast.finetune(resume={str(out)!r}); under "
            "torchrun, at any world size that divides batch_size)")


def _commit(run: _Run, grads, designed: Optional[Design], seconds: float, log: MetricsLog) -> dict:
    """Apply an update's gradients and keep everything it changed (the method's state, counters, RNG
    states, its metrics record: a write that fails after this loses nothing a checkpoint cannot hold);
    returns the record."""
    cfg, counters = run.cfg, run.counters
    record = apply(cfg, run.step, grads, run.optimizer)
    run.method_state = grads.state
    run.step += 1
    counters["consecutive_nonfinite"] = counters["consecutive_nonfinite"] + 1 if record["skipped"] else 0
    counters["seconds"] += seconds
    record.update(seconds=seconds, peak_memory_bytes=peak_memory_bytes(run.device), rollout=run.rollout.kind,
                  nonfinite_in_a_row=counters["consecutive_nonfinite"])
    if designed is not None:  # the pilots' work is this update's too
        record["design"] = run.commit_design(designed)
        pilots, batch = designed.pilot_cost, designed.batch_size
        record["design_reward_queries"] = pilots["reward_forward"] * batch
        record["reward_images"] += pilots["reward_forward"] * batch  # every image scored counts, pilots' too
        record["reward_backward_images"] += pilots["reward_backward"] * batch
        record["unet_forward_samples"] += (pilots["rollout_forward_equivalents"] + pilots["recomputed_steps"]) * batch
        record["unet_backward_samples"] += pilots["recomputed_steps"] * batch
    run.rng = capture_rng(run.generators)
    log.write(record)
    if designed is not None:
        run.save_design(run.step - 1, designed)
    return record


def _loop(run: _Run, log: MetricsLog, stops: StopSignals, callback) -> Optional[NonFiniteError]:
    """Updates up to train_steps, each followed by what is due at its step: checkpoint first, then
    sample grid and evaluation. Returns why it stopped early (too many non-finite updates), if so."""
    cfg, counters = run.cfg, run.counters
    bar = progress(cfg.train_steps, "finetune", "step", initial=run.step, leave=True, enabled=run.ranks.main)
    try:
        while run.step < cfg.train_steps:
            t0 = time.perf_counter()
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            step_cfg, designed = run.step_config(run.step)
            grads = run.method.step(run.method_state, step_cfg)
            with stops.deferred():  # the update is applied, logged and its RNG and method state kept as one
                record = _commit(run, grads, designed, time.perf_counter() - t0, log)
            step = run.step
            bar.update(1)
            bar.set_postfix(reward=record["reward_mean"], skipped=sum(1 for r in log.records if r["skipped"]))
            if counters["consecutive_nonfinite"] >= cfg.max_nonfinite:
                return NonFiniteError(
                    f"stopped at step {step}: {counters['consecutive_nonfinite']} updates in a row were skipped for "
                    f"a non-finite {record['skipped']} (max_nonfinite={cfg.max_nonfinite}); nothing was applied "
                    f"in those steps. Check the reward, or lower lr (now {cfg.lr}); metrics in {log.path}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                run.checkpoint(log.records)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.train_steps:
                run.sample_grid(step)
            run.evaluate(step)
            if callback is not None:
                callback(step, record)
    except (KeyboardInterrupt, RankFailure) as stop:  # every rank holds the state after `step`: rank 0 keeps it
        bar.close()
        with stops.deferred():  # a second signal waits until the checkpoint is written and the way back said
            path = run.checkpoint(log.records)
            if run.ranks.main:
                print(f"\n{_stop_reason(stop)} after step {run.step}/{cfg.train_steps}; checkpoint written to {path}.\n"
                      f"{_resume_hint(run.out)}", file=sys.stderr)
        raise
    finally:
        bar.close()
    return None


def _finish(run: _Run, log: MetricsLog, stopped: Optional[NonFiniteError], stops: StopSignals,
            t_session: float) -> Result:
    """The run's end, or a stop for non-finite updates (nothing trained so far may be lost): its
    checkpoint first, then the last evaluation and grid, the final LoRA, reward curve and summary."""
    cfg, out, counters, main, step = run.cfg, run.out, run.counters, run.ranks.main, run.step
    lora_path, curve = out / LORA_WEIGHT_NAME, out / "reward_curve.png"
    last_checkpoint = out / "checkpoints" / f"step_{step:06d}.safetensors"
    try:
        if run.checkpointed != step:
            with stops.deferred():
                run.checkpoint(log.records)
        run.evaluate(step, last=True)
        run.sample_grid(step)
        summary = jsonable({**summarize(log.records, counters["seconds"]),
                            "wall_seconds_this_session": time.perf_counter() - t_session,
                            "rollout": {"kind": run.rollout.kind, "reason": run.rollout.reason},
                            **({"design": {k: counters.get(k) for k in ("design", "designs",
                                                                        "design_forward_equivalents")}}
                               if cfg.method == AUTO else {}),
                            **({"eval": run.evaluation.records[-1]} if run.evaluation and run.evaluation.records
                               else {})})
        if main:
            save_lora(run.models.unet, out, step=step)
            draw_reward_curve(log.records, curve)
            atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2),
                                                                          encoding="utf-8"))
    except KeyboardInterrupt as stop:
        if main:
            print(f"\n{_stop_reason(stop)} while writing the final outputs of step {step}/{cfg.train_steps}; "
                  f"checkpoint {last_checkpoint} holds every step. {_resume_hint(out)} (it writes them)",
                  file=sys.stderr)
        raise
    run.ranks.barrier("waiting for rank 0's final outputs")  # so that every rank returns paths that exist
    outputs = [p for p in (lora_path, log.path, curve, out / "summary.json", out / "memory_plan.md", last_checkpoint,
                           out / "samples", out / "designs", out / "tensorboard", out / "eval.jsonl",
                           out / "eval_curve.png")
               if p.exists()]
    listing = ", ".join(p.relative_to(out).as_posix() + ("/" if p.is_dir() else "") for p in outputs)
    if stopped is not None:
        raise NonFiniteError(f"{stopped}. The LoRA of the last applied update and a checkpoint are in {out} "
                             f"({listing})")
    if main:
        print(f"done: {step} steps; outputs in {out}: {listing}", file=sys.stderr)
    return Result(out_dir=out, lora_path=lora_path, config_path=out / "config.yaml", metrics_path=log.path,
                  curve_path=curve, checkpoint_path=last_checkpoint, grid_paths=run.grids, metrics=summary)
