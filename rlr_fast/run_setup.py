"""A run's setup: everything a run does before its first update, checked before its out_dir changes.

`resolve_config` applies the overrides to the config (a Config, a preset or a YAML file) and finds
the checkpoint to resume; `load_run` loads the reward, model, LoRA, optimizer and RNGs (restored from
that checkpoint) into a `Run`, what the loop (rlr_fast.train) trains with; `prepare_out_dir` then
makes the out_dir's first changes. `is_complete` tells a resume of a run that has nothing left to do.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import Checkpoint, capture_rng, find_checkpoint, restore_checkpoint, restore_rng
from .config import Config, load_config
from .consistency import load_consistency
from .presets import PRESETS
from .distributed import Ranks
from .evaluation import RunEvaluation
from .inference import DTYPES, load_models
from .models import SDModels
from .lora import LORA_WEIGHT_NAME, add_lora, lora_parameters, lora_step
from .profiling import enable_profiling
from .rewards import Reward, get_reward, get_video_reward
from .run_dir import atomic_write, clear_leftovers, start_afresh, supersede
from .options import AUTO
from .prompts import PromptBank
from .methods import step_method
from .update import StepContext, StepMethod, TrainingRollout
from .video import check_num_frames, is_video_model, is_video_unet

def resolve_config(config, overrides: dict) -> tuple[Config, Optional[Checkpoint]]:
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


def is_complete(out: Path, checkpoint: Checkpoint, cfg: Config) -> bool:
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


@dataclass
class Run:
    """What a run trains with, loaded and checked before its out_dir changes, and where it stands (the
    loop in rlr_fast.train moves `step`, `rng`, `method_state`, `counters` and `checkpointed` on)."""

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


def load_run(cfg: Config, device: torch.device, checkpoint: Optional[Checkpoint], prompts: list[str], out: Path,
             ranks: Ranks) -> Run:
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
    start, counters, state = _starting_point(cfg, checkpoint, method, models, optimizer, generators, out, ranks)
    ranks.broadcast_parameters(params)
    return Run(cfg=cfg, out=out, device=device, models=models, reward=reward, bank=bank, params=params,
               optimizer=optimizer, generators=generators, method=method, method_state=state, start=start,
               counters=counters, plan_table=plan_table, evaluation=evaluation, ranks=ranks, step=start,
               rng=capture_rng(generators), checkpointed=None if checkpoint is None else checkpoint.step)


def _starting_point(cfg: Config, checkpoint: Optional[Checkpoint], method: StepMethod, models: SDModels, optimizer,
                    generators: dict, out: Path, ranks: Ranks) -> tuple[int, dict, object]:
    """The step, counters and method state the run starts from: resuming, `checkpoint`'s, with its LoRA,
    optimizer and RNG states restored; else step 0, with every global RNG seeded from cfg.seed."""
    if checkpoint is None:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        return 0, {"consecutive_nonfinite": 0, "seconds": 0.0}, method.initial_state()
    restore_rng(restore_checkpoint(checkpoint, models.unet, optimizer), generators)
    state = method.initial_state() if checkpoint.method_state() is None else method.load_state(
        *checkpoint.method_state())
    if ranks.main:
        written = checkpoint.meta.get("world_size", 1)
        print(f"resuming {out} at step {checkpoint.step} from {checkpoint.path}" + (
            f" (written by {written} ranks, continued by {ranks.world}: the same batches, equal up to "
            "floating-point rounding)" if written != ranks.world else ""), file=sys.stderr)
    return checkpoint.step, checkpoint.meta["counters"], state


def prepare_out_dir(run: Run, resumed: bool) -> None:
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
