"""SQDF's off-policy replay buffer of sampled chains, and the StepMethod that trains from it
(docs/estimator.md §11.4).

The buffer keeps the last `capacity` chains (first in, first out), on the CPU. Of each chain it
stores only what SQDF reads: the inputs x_k of the steps it draws from (`sqdf_steps`, [first, stop)),
with the chain's prompt, its reward R(x_0) and the update that sampled it. All chains of a buffer
share one schedule (timesteps and step coefficients), kept once.

A `ReplayBuffer` is a value that never changes: `added` returns a new buffer. Both share one
storage of capacity + headroom slots, and a new chain only goes into a slot the old buffer does not
hold, so an update that is abandoned after adding chains leaves the committed buffer intact
(rlr_fast.update's contract for a method's state). `headroom` is the most chains added before the
next commit.

Sampling (`sample`) draws from a generator in the chains' age order, so the same buffer and
generator state give the same draw; `to_checkpoint` / `from_checkpoint` turn the buffer into
tensors and JSON and back, bit-exactly.

    uniform  n distinct chains uniformly, each at a step uniform on the stochastic steps of [first, stop)
    reward   n (chain, step) pairs with replacement, with probability proportional to
             max(R, 0) * gamma ** (steps after k) over those steps: the public SQDF code's
             reward-and-discount prioritised replay
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .inference import autocast
from .profiling import nvtx_range
from .rollout import Trajectory
from .samplers import TABLES, StepSchedule
from .scoring import NonFiniteRewards
from .sqdf import StepStates, estimate_states, step_range, stochastic_steps
from .update import COST_KEYS, Gradients, StepMethod

SAMPLINGS = ("uniform", "reward")
_PER_CHAIN = ("rewards", "prompt_ids", "added_at")


class _Storage:
    """The slots the buffers of one run share, allocated by the first chain added."""

    def __init__(self, slots: int, chain_shape: tuple[int, ...], dtype: torch.dtype,
                 schedule: StepSchedule, guidance_scale: float):
        self.latents = torch.zeros((slots,) + chain_shape, dtype=dtype)  # per slot: (states, ...)
        self.rewards = torch.zeros(slots, dtype=torch.float64)
        self.prompt_ids = torch.zeros(slots, dtype=torch.int64)
        self.added_at = torch.zeros(slots, dtype=torch.int64)  # the update that sampled each chain
        self.schedule, self.guidance_scale = schedule, guidance_scale


@dataclass(frozen=True)
class ReplayBuffer:
    """The last `capacity` chains, each stored as its states x_k for k in `steps` = [first, stop)."""

    capacity: int
    steps: tuple[int, int]
    headroom: int  # chains that may be added before the next commit (one update's rollouts)
    sampling: str = "uniform"
    gamma: float = 1.0
    storage: Optional[_Storage] = None
    start: int = 0  # slot of the oldest chain
    size: int = 0

    def __post_init__(self):
        for name in ("capacity", "headroom"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"replay {name} must be an int >= 1, got {value!r}")
        first, stop = self.steps
        if not 0 <= first < stop:
            raise ValueError(f"replay steps must be a non-empty range [first, stop) of steps >= 0, got "
                             f"{list(self.steps)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"replay sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def __len__(self) -> int:
        return self.size

    @property
    def slots(self) -> torch.Tensor:
        """The storage slots of the chains held, oldest first."""
        return (self.start + torch.arange(self.size)) % (self.capacity + self.headroom)

    def added(self, traj: Trajectory, rewards: torch.Tensor, prompt_ids: torch.Tensor, step: int) -> "ReplayBuffer":
        """A buffer that also holds the chains of `traj`, with their rewards R(x_0) (B,) and prompt ids
        (B,), sampled at update `step`; the oldest chains make room once `capacity` is reached."""
        first, stop = self.steps
        batch = traj.batch_size
        if stop > traj.num_steps:
            raise ValueError(f"the buffer stores steps [{first}, {stop}) but the chain has {traj.num_steps}")
        if batch > self.headroom:
            raise ValueError(f"{batch} chains exceed the replay buffer's headroom of {self.headroom} per update")
        schedule = traj.schedule.to("cpu")
        storage = self.storage
        if storage is None:
            storage = _Storage(self.capacity + self.headroom, (stop - first,) + tuple(traj.latents.shape[2:]),
                               traj.latents.dtype, schedule, traj.guidance_scale)
        elif traj.guidance_scale != storage.guidance_scale or not schedule.equal(storage.schedule):
            raise ValueError("these chains were sampled with another schedule (timesteps, eta or guidance) than "
                             "the chains in the replay buffer")
        slots = (self.start + self.size + torch.arange(batch)) % (self.capacity + self.headroom)
        storage.latents[slots] = traj.latents[first:stop].detach().transpose(0, 1).to("cpu", storage.latents.dtype)
        storage.rewards[slots] = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu().reshape(batch)
        storage.prompt_ids[slots] = torch.as_tensor(prompt_ids, dtype=torch.int64).cpu().reshape(batch)
        storage.added_at[slots] = step
        size = min(self.size + batch, self.capacity)
        start = (self.start + self.size + batch - size) % (self.capacity + self.headroom)
        return dataclasses.replace(self, storage=storage, start=start, size=size)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chains, steps), each (n,) int64: which chains (0 the oldest held) at which step k (sampling order)."""
        if self.size == 0:
            raise ValueError("cannot draw from an empty replay buffer")
        first, stop = self.steps
        steps = stochastic_steps(self.storage.schedule.sigmas, first, stop)
        if self.sampling == "uniform":
            if n > self.size:
                raise ValueError(f"cannot draw {n} distinct chains from a replay buffer holding {self.size} "
                                 f"(capacity {self.capacity})")
            chains = torch.randperm(self.size, generator=generator)[:n]
            return chains, steps[torch.randint(len(steps), (n,), generator=generator)]
        num_steps = self.storage.schedule.num_steps
        discount = self.gamma ** (num_steps - 1 - steps.double())
        weights = self.storage.rewards[self.slots].clamp(min=0)[:, None] * discount[None, :]
        if not weights.sum() > 0:
            raise ValueError("replay_sampling='reward' draws chains with probability proportional to max(R, 0), but "
                             "every reward in the buffer is <= 0; use replay_sampling='uniform'")
        pairs = torch.multinomial(weights.flatten(), n, replacement=True, generator=generator)
        return pairs // len(steps), steps[pairs % len(steps)]

    def chains(self, name: str, chains: torch.Tensor) -> torch.Tensor:
        """A per-chain value ("rewards", "prompt_ids" or "added_at") of the chains drawn by `sample`."""
        return getattr(self.storage, name)[self.slots[chains]]

    def states(self, chains: torch.Tensor, steps: torch.Tensor, device: torch.device,
               encoder_hidden_states: Optional[torch.Tensor] = None,
               negative_encoder_hidden_states: Optional[torch.Tensor] = None) -> StepStates:
        """The drawn chains at their steps, on `device`, with the caller's conditioning for their prompts."""
        x = self.storage.latents[self.slots[chains], steps - self.steps[0]].to(device)
        return StepStates(x=x, steps=steps.to(device), schedule=self.storage.schedule.to(device),
                          encoder_hidden_states=encoder_hidden_states,
                          negative_encoder_hidden_states=negative_encoder_hidden_states,
                          guidance_scale=self.storage.guidance_scale)

    # ------------------------------------------------------------------------------------------
    # Checkpoints: tensors (safetensors) and JSON-ready values, no pickle

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The chains held, oldest first, and the settings; `from_checkpoint` restores the same buffer."""
        meta = {"capacity": self.capacity, "steps": list(self.steps), "headroom": self.headroom,
                "sampling": self.sampling, "gamma": self.gamma, "size": self.size, "guidance_scale": None}
        if self.storage is None:
            return {}, meta
        meta["guidance_scale"] = self.storage.guidance_scale
        slots = self.slots
        tensors = {name: getattr(self.storage, name)[slots].contiguous() for name in ("latents",) + _PER_CHAIN}
        tensors.update({f"schedule/{k}": v.contiguous() for k, v in self.storage.schedule.tables().items()})
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ReplayBuffer":
        buffer = cls(meta["capacity"], tuple(meta["steps"]), meta["headroom"], meta["sampling"], meta["gamma"])
        if not tensors:
            return buffer
        latents = tensors["latents"]
        storage = _Storage(buffer.capacity + buffer.headroom, tuple(latents.shape[1:]), latents.dtype,
                           StepSchedule(**{k: tensors[f"schedule/{k}"] for k in TABLES}), meta["guidance_scale"])
        size = meta["size"]
        storage.latents[:size] = latents
        for name in _PER_CHAIN:
            getattr(storage, name)[:size] = tensors[name]
        return dataclasses.replace(buffer, storage=storage, size=size)


# ----------------------------------------------------------------------------------------------
# method="sqdf" with replay_capacity > 0


@dataclass(frozen=True)
class ReplayState:
    """SQDF with a buffer between optimizer steps: the buffer and the optimizer steps taken."""

    buffer: ReplayBuffer
    updates: int = 0
    # too large to copy into every checkpoint (3.1 GiB at SD1.4 size): rlr_fast.checkpoint keeps it once
    stored_once = True

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.buffer.to_checkpoint()
        return tensors, {"buffer": meta, "updates": self.updates}


class SQDFReplay(StepMethod):
    """Every `replay_ratio`-th optimizer step adds batch_size x grad_accum fresh chains (their x_0
    scored once: the step's rewards); every step draws as many (chain, step) pairs from the buffer
    and accumulates SQDF's gradient over them in grad_accum micro-batches (docs/estimator.md §11.4)."""

    def initial_state(self) -> ReplayState:
        cfg = self.ctx.cfg
        steps = step_range(cfg, cfg.num_steps)
        return ReplayState(ReplayBuffer(cfg.replay_capacity, steps, cfg.batch_size * cfg.grad_accum,
                                        cfg.replay_sampling, cfg.sqdf_gamma))

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> ReplayState:
        return ReplayState(ReplayBuffer.from_checkpoint(tensors, meta["buffer"]), meta["updates"])

    def gradients(self, state: ReplayState) -> Gradients:
        """A NaN/Inf reward of a fresh chain skips the step and adds none of its chains (the next step
        samples afresh); one of a soft Q skips the step and keeps the fresh chains."""
        ctx, cfg = self.ctx, self.ctx.cfg
        ctx.zero_grad()
        cost = dict.fromkeys(COST_KEYS, 0)
        buffer, rewards = state.buffer, []
        if state.updates % cfg.replay_ratio == 0:
            for _ in range(cfg.grad_accum):
                scored = ctx.sample_scored(cost)
                if scored is None:
                    return Gradients([], {}, "reward", None, state=state, cost=cost)
                ids, traj, values = scored
                buffer = buffer.added(traj, values, ids, state.updates)
                rewards += values.tolist()
        after = ReplayState(buffer, state.updates + 1)
        batch = cfg.batch_size
        chains, steps = buffer.sample(batch * cfg.grad_accum, ctx.generators["estimator"])
        stats: dict = {}
        for rows in torch.arange(len(chains)).split(batch):
            ids = buffer.chains("prompt_ids", chains[rows])
            conditioning = ctx.bank.batch(ids, cfg.guidance_scale)
            states = buffer.states(chains[rows], steps[rows], ctx.device, conditioning["encoder_hidden_states"],
                                   conditioning["negative_encoder_hidden_states"])
            reward_fn = ctx.reward_fn(ids)
            try:
                with nvtx_range("estimate"), autocast(ctx.device, ctx.dtype):
                    micro = estimate_states(ctx.models.unet, states, reward_fn, ctx.options,
                                            generator=ctx.generators["estimator"])
            except NonFiniteRewards:
                return Gradients(rewards, stats, "reward", None, state=after, cost=cost)
            stats = ctx.count(micro, cost, stats)
        ages = state.updates - buffer.chains("added_at", chains)
        stats.update(replay_size=len(buffer), replay_age_mean=float(ages.double().mean()))
        grad_norm = ctx.average_and_clip(cfg.grad_accum)
        return Gradients(rewards, stats, None if math.isfinite(grad_norm) else "gradient", grad_norm, state=after,
                         cost=cost)
