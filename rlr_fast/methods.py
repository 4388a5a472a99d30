"""The run's StepMethod, chosen by its `method`.

A module of its own because the methods with state across steps (rlr_fast.ddpo, rlr_fast.replay)
build on rlr_fast.update: the base module naming its subclasses would make an import circle.
"""

from __future__ import annotations

from .ddpo import DDPOSteps, GRPOSteps
from .replay import SQDFReplay
from .update import OnPolicy, StepContext, StepMethod


def step_method(ctx: StepContext) -> StepMethod:
    """The StepMethod of the run's `method`: OnPolicy unless the method keeps state across steps."""
    stateful = ctx.cfg.method in ("ddpo", "grpo") or ctx.cfg.method == "sqdf" and ctx.cfg.replay_capacity
    if stateful and ctx.ranks.world > 1:
        raise ValueError(f"method={ctx.cfg.method!r} keeps per-run state (DDPO's and GRPO's sampled epoch, DDPO's "
                         "reward history, SQDF's replay buffer) that data parallel does not shard; run it as one "
                         "process, or use "
                         "sqdf with replay_capacity=0 or rlr, zo, full_bp, truncated_bp, auto under torchrun")
    if ctx.cfg.method == "ddpo":
        return DDPOSteps(ctx)
    if ctx.cfg.method == "grpo":
        return GRPOSteps(ctx)
    if ctx.cfg.method == "sqdf" and ctx.cfg.replay_capacity:
        return SQDFReplay(ctx)
    return OnPolicy(ctx)
