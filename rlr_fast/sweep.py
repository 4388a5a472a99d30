"""Reverse sweeps over recomputed steps: the only place estimators run the model.

`rlr_math.md` section 4: the rollout stored x_T .. x_0 and every step's noise, so a pathwise
term never needs more than one step's activations. Start from a cotangent on one step's mean,
recompute that step from its stored input with grad enabled, back-propagate (parameter
gradients accumulate in `.grad`, the input's gradient becomes the next cotangent), free it,
move one step back. Likelihood-ratio steps need no input gradient and are independent, so
several run in one model call with per-sample timesteps, chunked by `max_batch`.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .profiling import nvtx_range
from .rollout import Trajectory, recompute_steps


@dataclass
class SweepOptions:
    """How recomputed steps run: memory versus recomputation."""

    max_batch: Optional[int] = None  # samples per model call in likelihood-ratio chunks (None: all)
    checkpoint: bool = False  # gradient checkpointing inside the model (diffusers models)
    split_cfg: bool = False  # guidance: unconditional and conditional passes as two calls
    backend: str = "auto"  # fused DDIM step backend

    def __post_init__(self):
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {self.max_batch!r}")


@dataclass
class CallCounter:
    """Model forward and backward passes (one per call on any batch)."""

    forward: int = 0
    backward: int = 0
    calls_per_step: int = 1  # 2 with split classifier-free guidance


class SavedTensorMemory:
    """Peak bytes of tensors saved for backward, live at once (parameters excluded).

    Each saved tensor is counted once per storage while any saved reference to it is alive;
    a reference dies when autograd frees the graph that saved it. This measures what a
    GPU allocator would have to keep for backward, on any device, CPU included.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list[int]] = {}  # storage ptr -> [refcount, nbytes]
        self.current = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._exclude or ptr == 0:
            return t
        entry = self._live.get(ptr)
        if entry is None:
            entry = self._live[ptr] = [0, t.untyped_storage().nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, ptr)
        return holder

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[ptr]

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Saved) else obj

    @contextlib.contextmanager
    def track(self) -> Iterator["SavedTensorMemory"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


@contextlib.contextmanager
def gradient_checkpointing(model, enabled: bool):
    """Turn on the model's own (per-block) gradient checkpointing for the duration.

    Checkpointing the whole step would save nothing here (a sweep already holds one step);
    per-block checkpointing trades one extra forward for the step's internal activations.
    """
    if not enabled:
        yield
        return
    if not hasattr(model, "enable_gradient_checkpointing"):
        raise ValueError(f"checkpoint=True needs a model with enable_gradient_checkpointing() "
                         f"(diffusers models have it); {type(model).__name__} has not")
    was = bool(getattr(model, "is_gradient_checkpointing", False))
    model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was:
            model.disable_gradient_checkpointing()


def _steps_forward(model, traj, ks, sample, opts: SweepOptions, counter: CallCounter):
    counter.forward += counter.calls_per_step
    return recompute_steps(model, traj, ks, sample, split_cfg=opts.split_cfg, backend=opts.backend)


def pathwise_sweep(model, traj: Trajectory, last: int, first: int, cotangent: torch.Tensor,
                   opts: SweepOptions, counter: CallCounter) -> None:
    """Back-propagate `cotangent`, given on the mean of step `last`, through steps last .. first.

    Steps are indices k (scheduler order), `first <= last`. The output of step k is
    mean_k + sigma_k * noise_k with the noise held fixed, so a cotangent on x_{k+1} is a
    cotangent on mean_k. Parameter gradients accumulate into `.grad`.
    """
    g = cotangent
    for k in range(last, first - 1, -1):
        with nvtx_range(f"sweep step {k}"):
            needs_input = k > first
            x = traj.latents[k].detach().requires_grad_(needs_input)
            mean = _steps_forward(model, traj, [k], x.unsqueeze(0), opts, counter)[0]
            torch.autograd.backward(mean, g)
            counter.backward += counter.calls_per_step
            del mean
            g = x.grad if needs_input else None


def likelihood_ratio(model, traj: Trajectory, ks: Sequence[int], weights: torch.Tensor,
                     opts: SweepOptions, counter: CallCounter) -> None:
    """Accumulate sum_k sum_b weights[i, b] * VJP(mean_k^b, noise_k^b / sigma_k) into `.grad`.

    `weights` (len(ks), B) carries the reward, baseline, batch mean and any subsampling
    weight. Steps run `max_batch // B` at a time in one model call.
    """
    b = traj.batch_size
    per_call = max(1, (opts.max_batch or len(ks) * b) // b)
    for start in range(0, len(ks), per_call):
        chunk = list(ks[start:start + per_call])
        with nvtx_range(f"likelihood ratio steps {chunk}"):
            idx = torch.as_tensor(chunk, device=traj.latents.device)
            mean = _steps_forward(model, traj, chunk, None, opts, counter)
            scale = weights[start:start + len(chunk)].to(mean.dtype) / traj.sigmas[idx].to(mean.dtype)[:, None]
            cot = traj.noises[idx] * scale.reshape(scale.shape + (1,) * (mean.dim() - 2))
            torch.autograd.backward(mean, cot)
            counter.backward += counter.calls_per_step
            del mean


@dataclass
class GradTerms:
    """Norms of what each named term added to the parameter gradients."""

    params: list
    norms: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def term(self, name: str):
        before = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        yield
        sq = 0.0
        for p, b0 in zip(self.params, before):
            if p.grad is not None:
                d = p.grad.detach() if b0 is None else p.grad.detach() - b0
                sq += float(d.double().pow(2).sum())
        self.norms[name] = self.norms.get(name, 0.0) + sq ** 0.5
