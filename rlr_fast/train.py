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
it changes the out_dir (only a folder it marked as its own: rlr_fast.run_dir); rlr_fast.run_setup
resolves the config, loads the run and makes the out_dir's first changes. Ctrl-C and SIGTERM
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
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import Checkpoint, capture_rng, check_compatible, meta_checksum, prune_checkpoints, save_checkpoint
from .config import Config
from .presets import load_prompts
from .design import Design
from .distributed import RankFailure, Ranks, process_group
from .inference import check_model, generate_images, progress, prompt_rows, resolve_device, save_grid
from .metrics import MetricsLog, draw_reward_curve, jsonable, peak_memory_bytes, resume_records, summarize
from .lora import LORA_WEIGHT_NAME, save_lora
from .profiling import nvtx_range
from .run_dir import RunLock, WriteError, atomic_write, check_out_dir
from .run_setup import Run, is_complete, load_run, prepare_out_dir, resolve_config
from .options import AUTO
from .prompts import PromptSchedule
from .update import apply, design_estimator


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
    cfg, checkpoint = resolve_config(config, overrides)
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
            if checkpoint is not None and is_complete(out, checkpoint, cfg):
                return _complete(out, checkpoint, records if damaged_records else None, ranks)
            stops = held.enter_context(StopSignals())
            run = load_run(cfg, device, checkpoint, prompts, out, ranks)
            return _train(run, records, checkpoint is not None, stops, callback)


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


# ----------------------------------------------------------------------------------------------
# What the loop writes and designs along the way


def _sample_grid(run: Run, step: int) -> None:
    """samples/step_NNNNNN.png (.gif for videos; rank 0 draws it): the first `sample_prompts` prompts
    (rows) x `sample_seeds` (columns)."""
    cfg, prompts = run.cfg, min(run.cfg.sample_prompts, len(run.bank.prompts))
    if not prompts or not cfg.sample_seeds or not run.ranks.main:
        return
    cond = run.bank.conditioning(torch.arange(prompts))  # under the prompt schedule when there is one
    with nvtx_range("sample grid"):
        images = generate_images(run.models, cond["encoder_hidden_states"], run.bank.negative, cfg.sample_seeds,
                                 num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                 dtype=run.dtype, desc=f"sample grid (step {step})",
                                 latent_hw=run.models.latent_hw(cfg.resolution),
                                 prompt_index=cond.get("prompt_index"), num_frames=cfg.num_frames)
    suffix = "gif" if images.dim() == 5 else "png"
    run.grids.append(save_grid(prompt_rows(images, len(cfg.sample_seeds)), prompts,
                               run.out / "samples" / f"step_{step:06d}.{suffix}"))


def _step_config(run: Run, step: int) -> tuple[Config, Optional[Design]]:
    """The config update `step` runs: with method='auto', the current design applied, and a new design
    (from pilot batches) at the first update and every design_every updates; a new one is kept only
    when its update commits (`_commit_design`), so a stopped step designs again on resume."""
    cfg = run.cfg
    if cfg.method != AUTO:
        return cfg, None
    designed = None
    if "design" not in run.counters or (cfg.design_every and step % cfg.design_every == 0):
        designed = design_estimator(cfg, run.models, run.bank, run.reward, run.rollout,
                                    run.generators["design"], run.device, run.dtype)
        # every rank designs from the same pilots (its "design" generator and LoRA are the same everywhere)
        run.ranks.agree(json.dumps(jsonable(designed.config_overrides()), sort_keys=True), "estimator designs",
                        hint="the same pilots should give the same design; rerun with a fixed method")
    return cfg.with_overrides(designed.config_overrides() if designed else run.counters["design"]), designed


def _commit_design(run: Run, designed: Design) -> dict:
    """Keep a design made for this update (in the counters, so checkpoints carry it); returns its
    metrics entry. Its report is written by `_save_design`."""
    run.counters["design"] = jsonable(designed.config_overrides())
    run.counters["designs"] = run.counters.get("designs", 0) + 1
    run.counters["design_forward_equivalents"] = (run.counters.get("design_forward_equivalents", 0.0)
                                                 + designed.pilot_cost["forward_equivalents"])
    return jsonable(designed.summary())


def _save_design(run: Run, step: int, designed: Design) -> None:
    """designs/step_NNNNNN.md and .png: the report of the design update `step` ran with."""
    if run.ranks.main:
        designed.save(run.out / "designs", f"step_{step:06d}")


def _evaluate(run: Run, step: int, last: bool = False) -> None:
    """The eval_every evaluation at `step` when one is due there (RunEvaluation says when)."""
    if run.evaluation is not None:
        with nvtx_range("evaluation"):
            run.evaluation(step, last)


def _write_checkpoint(run: Run, records: list[dict]) -> Path:
    """checkpoints/step_NNNNNN.safetensors of the last committed step with the metrics `records`,
    written by rank 0 (the state is the same on every rank), then all but the newest
    keep_checkpoints deleted."""
    path = run.out / "checkpoints" / f"step_{run.step:06d}.safetensors"
    if run.ranks.main:
        save_checkpoint(path, step=run.step, cfg=run.cfg.as_run(), unet=run.models.unet,
                        optimizer=run.optimizer, rng=run.rng, counters=run.counters,
                        method_state=run.method_state, world_size=run.ranks.world, records=records)
        prune_checkpoints(path.parent, run.cfg.keep_checkpoints)
    run.checkpointed = run.step
    return path


def _write_failed(run: Run, failed: WriteError, records: list[dict]) -> WriteError:
    """`failed` with what became of the trained steps: a checkpoint of the last committed step is
    tried first (unless there is one)."""
    step, out = run.step, run.out
    if run.checkpointed == step:
        kept = f"the checkpoint of step {step} is in {out / 'checkpoints'}"
    elif step == 0:
        return WriteError(failed.path, failed.error, "no step was trained; start the run again once the disk is "
                                                     "fixed (or free space)")
    else:
        try:
            kept = f"checkpoint written to {_write_checkpoint(run, records)}"
        except WriteError as again:
            kept = (f"the checkpoint of step {step} could not be written either ({again.error.strerror}): the "
                    f"steps after the newest checkpoint in {out / 'checkpoints'} are lost")
    return WriteError(failed.path, failed.error, f"stopped after step {step}/{run.cfg.train_steps}; {kept}. "
                                                 f"Once the disk is fixed (or has free space), resume with: "
                                                 f"rlr-fast finetune --resume {out}")


def _train(run: Run, records: list[dict], resumed: bool, stops: StopSignals, callback) -> Result:
    """The loop, from the run's start to `train_steps`, and the run's final outputs (rank 0 writes).
    A write that fails stops the run with a WriteError, after a checkpoint."""
    log = MetricsLog(run.out, [], tensorboard=False, write=False)
    try:
        if run.ranks.main:  # everything is loaded and checked: only now does the out_dir change
            prepare_out_dir(run, resumed)
        log = MetricsLog(run.out, records, tensorboard=run.cfg.tensorboard, write=run.ranks.main)
        if run.evaluation is not None:
            run.evaluation.start(run.out, run.start)
        if not resumed:
            _sample_grid(run, 0)
        _evaluate(run, run.start)
        t_session = time.perf_counter()
        stopped = _loop(run, log, stops, callback)
        return _finish(run, log, stopped, stops, t_session)
    except WriteError as failed:
        with stops.deferred():
            raise _write_failed(run, failed, log.records) from None
    finally:
        log.close()


def _stop_reason(stop: BaseException) -> str:
    return (f"stopped by {stop}" if isinstance(stop, StopRequested) else "interrupted"
            if isinstance(stop, KeyboardInterrupt) else "another rank failed")


def _resume_hint(out: Path) -> str:
    return (f"Resume with: rlr-fast finetune --resume {out}   (Python: rlr_fast.finetune(resume={str(out)!r}); under "
            "torchrun, at any world size that divides batch_size)")


def _commit(run: Run, grads, designed: Optional[Design], seconds: float, log: MetricsLog) -> dict:
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
        record["design"] = _commit_design(run, designed)
        pilots, batch = designed.pilot_cost, designed.batch_size
        record["design_reward_queries"] = pilots["reward_forward"] * batch
        record["reward_images"] += pilots["reward_forward"] * batch  # every image scored counts, pilots' too
        record["reward_backward_images"] += pilots["reward_backward"] * batch
        record["unet_forward_samples"] += (pilots["rollout_forward_equivalents"] + pilots["recomputed_steps"]) * batch
        record["unet_backward_samples"] += pilots["recomputed_steps"] * batch
    run.rng = capture_rng(run.generators)
    log.write(record)
    if designed is not None:
        _save_design(run, run.step - 1, designed)
    return record


def _loop(run: Run, log: MetricsLog, stops: StopSignals, callback) -> Optional[NonFiniteError]:
    """Updates up to train_steps, each followed by what is due at its step: checkpoint first, then
    sample grid and evaluation. Returns why it stopped early (too many non-finite updates), if so."""
    cfg, counters = run.cfg, run.counters
    bar = progress(cfg.train_steps, "finetune", "step", initial=run.step, leave=True, enabled=run.ranks.main)
    try:
        while run.step < cfg.train_steps:
            t0 = time.perf_counter()
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            step_cfg, designed = _step_config(run, run.step)
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
                _write_checkpoint(run, log.records)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.train_steps:
                _sample_grid(run, step)
            _evaluate(run, step)
            if callback is not None:
                callback(step, record)
    except (KeyboardInterrupt, RankFailure) as stop:  # every rank holds the state after `step`: rank 0 keeps it
        bar.close()
        with stops.deferred():  # a second signal waits until the checkpoint is written and the way back said
            path = _write_checkpoint(run, log.records)
            if run.ranks.main:
                print(f"\n{_stop_reason(stop)} after step {run.step}/{cfg.train_steps}; checkpoint written to {path}.\n"
                      f"{_resume_hint(run.out)}", file=sys.stderr)
        raise
    finally:
        bar.close()
    return None


def _finish(run: Run, log: MetricsLog, stopped: Optional[NonFiniteError], stops: StopSignals,
            t_session: float) -> Result:
    """The run's end, or a stop for non-finite updates (nothing trained so far may be lost): its
    checkpoint first, then the last evaluation and grid, the final LoRA, reward curve and summary."""
    cfg, out, counters, main, step = run.cfg, run.out, run.counters, run.ranks.main, run.step
    lora_path, curve = out / LORA_WEIGHT_NAME, out / "reward_curve.png"
    last_checkpoint = out / "checkpoints" / f"step_{step:06d}.safetensors"
    try:
        if run.checkpointed != step:
            with stops.deferred():
                _write_checkpoint(run, log.records)
        _evaluate(run, step, last=True)
        _sample_grid(run, step)
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
