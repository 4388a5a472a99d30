"""Reverse sweeps and likelihood-ratio chunks over recomputed steps: the only place estimators run the model.

The rollout stored x_T .. x_0 and every step's noise, so no term needs more than one step's
activations (docs/estimator.md, the memory argument). A pathwise term starts from a cotangent on
one step's mean, recomputes that step from its stored input with grad enabled, back-propagates
(parameter gradients accumulate in `.grad`, the input's gradient becomes the next cotangent),
frees it and moves one step back. Likelihood-ratio steps need no input gradient and are
independent: each chunk of them runs in one model call with per-sample timesteps, one step's
batch per call unless `max_batch` asks for more (activation memory then grows with the chunk).

With guidance and `split_cfg`, the mean c_x x + c_e ((1 - w) e_u + w e_c) is linear in the two
model outputs, so the cotangent of each is known before it is computed: the unconditional and
conditional passes run and back-propagate one after the other, and only one half's graph is alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from .options import EstimatorOptions
from .ddim import ddim_step
from .profiling import nvtx_range
from .rollout import Trajectory, predict, recompute_steps, stacked_inputs
from .samplers import StepSchedule

# A cotangent on the recomputed means (n, B, ...), or a function of those means that returns it
# (DDPO's surrogate depends on them).
Cotangent = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class CallCounter:
    """Model calls (one per call on any batch), and the work they did in sample-steps: one sample
    through one step's model evaluation, both guidance passes included (docs/estimator.md §7)."""

    forward: int = 0
    backward: int = 0
    forward_samples: int = 0
    backward_samples: int = 0


class SavedTensorMemory:
    """Peak bytes of tensors saved for backward, live at once (parameters excluded).

    Each saved tensor is counted once per storage while any saved reference to it is alive;
    a reference dies when autograd frees the graph that saved it. This measures what a
    GPU allocator would have to keep for backward, on any device, CPU and meta included.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._live: dict[int, list[int]] = {}  # storage id -> [refcount, nbytes]
        self.current = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        ptr = t.untyped_storage()._cdata  # the storage's identity (meta storages have no data pointer)
        if ptr in self._exclude:
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


def resident_tensors(model, traj: Trajectory) -> list:
    """Tensors alive before and after an update: not activations, so not counted as such."""
    cond = [traj.encoder_hidden_states, traj.negative_encoder_hidden_states]
    return (list(model.parameters()) + list(model.buffers()) + [traj.latents, traj.noises]
            + [c for c in cond if c is not None])


def supports_gradient_checkpointing(model) -> bool:
    """Whether `checkpoint_unet=True` can work on `model`: diffusers models say so per class
    (UNet3DConditionModel, for one, implements none)."""
    return (hasattr(model, "enable_gradient_checkpointing")
            and getattr(model, "_supports_gradient_checkpointing", True) is not False)


@contextlib.contextmanager
def gradient_checkpointing(model, enabled: bool):
    """Turn on the model's own (per-block) gradient checkpointing for the duration.

    Checkpointing the whole step would save nothing here (a sweep already holds one step);
    per-block checkpointing trades one extra forward for the step's internal activations.
    """
    if not enabled:
        yield
        return
    if not supports_gradient_checkpointing(model):
        raise ValueError(f"checkpoint_unet=True, but {type(model).__name__} has no gradient checkpointing of its "
                         "own; set checkpoint_unet=False (and lower max_batch or the batch size if one step's "
                         "activations do not fit)")
    was = bool(getattr(model, "is_gradient_checkpointing", False))
    model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was:
            model.disable_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------
# One model call (or two with split guidance) and its backward


def _backward_steps(model, traj: Trajectory, ks: Sequence[int], sample: Optional[torch.Tensor],
                    cotangent: Cotangent, options: EstimatorOptions, counter: CallCounter) -> None:
    """Recompute the means of steps `ks` (from `sample` (n, B, ...), else the stored inputs) and
    back-propagate `cotangent` on them into `.grad` (and into `sample` when it requires grad)."""
    samples = len(ks) * traj.batch_size
    counter.forward_samples += samples
    counter.backward_samples += samples
    if options.split_cfg and traj.uses_cfg:
        if callable(cotangent):  # its value needs the mean: a forward without graph first
            with torch.no_grad():
                mean = recompute_steps(model, traj, ks, sample, split_cfg=True, backend=options.backend)
            counter.forward += 2
            counter.forward_samples += samples
            cotangent = cotangent(mean)
        x, t, cond, negative, (c_x, c_e, _) = stacked_inputs(traj, ks, sample)
        _split_guidance_backward(model, x, t, cond, negative, traj.guidance_scale, c_x, c_e, cotangent, counter)
        return
    mean = recompute_steps(model, traj, ks, sample, backend=options.backend)
    counter.forward += 1
    if callable(cotangent):
        cotangent = cotangent(mean.detach())
    torch.autograd.backward(mean, cotangent)
    counter.backward += 1


def _split_guidance_backward(model, x: torch.Tensor, t: torch.Tensor, cond, negative, w: float, a_x: torch.Tensor,
                             a_e: torch.Tensor, cotangent: torch.Tensor, counter: CallCounter) -> None:
    """The VJP of a_x x + a_e ((1 - w) e_u + w e_c), one model output at a time: the step's mean
    (a = c_x, c_e) or its Tweedie x0_hat (a = d_x, d_e), both linear in the two outputs."""
    per_sample = (-1,) + (1,) * (x.dim() - 1)
    g = cotangent.reshape(x.shape)
    for conditioning, share in ((negative, 1.0 - w), (cond, w)):
        out, _ = predict(model, x, t, conditioning)
        counter.forward += 1
        torch.autograd.backward(out, g * (share * a_e).to(g.dtype).reshape(per_sample))
        counter.backward += 1
        del out  # freed before the other half runs
    if x.requires_grad:  # the direct dependence on x
        torch.autograd.backward(x, g * a_x.to(g.dtype).reshape(per_sample))


# ----------------------------------------------------------------------------------------------
# What the estimators call


def pathwise_sweep(model, traj: Trajectory, last: int, first: int, cotangent: torch.Tensor,
                   options: EstimatorOptions, counter: CallCounter,
                   after_step: Optional[Callable[[int], None]] = None) -> None:
    """Back-propagate `cotangent`, given on the mean of step `last`, through steps last .. first.

    Steps are indices k (scheduler order), `first <= last`. The output of step k is
    mean_k + sigma_k * noise_k with the noise held fixed, so a cotangent on x_{k+1} is a
    cotangent on mean_k. Parameter gradients accumulate into `.grad`; `after_step(k)`, when
    given, runs once step k's share is in `.grad` (rlr_fast.design reads each step's share there).
    """
    g = cotangent
    for k in range(last, first - 1, -1):
        with nvtx_range(f"sweep step {k}"):
            needs_input = k > first
            x = traj.latents[k].detach().requires_grad_(needs_input)
            _backward_steps(model, traj, [k], x.unsqueeze(0), g.unsqueeze(0), options, counter)
            g = x.grad if needs_input else None
        if after_step is not None:
            after_step(k)


def _chunks(ks: Sequence[int], batch: int, max_batch: Optional[int]) -> Iterator[tuple[slice, list[int]]]:
    """(rows, steps) of each model call: max_batch // batch steps per call, one when max_batch is None."""
    per_call = max(1, (max_batch or batch) // batch)
    for start in range(0, len(ks), per_call):
        yield slice(start, start + per_call), list(ks[start:start + per_call])


def likelihood_ratio(model, traj: Trajectory, ks: Sequence[int], weights: torch.Tensor,
                     options: EstimatorOptions, counter: CallCounter) -> None:
    """Accumulate sum_k sum_b weights[i, b] * VJP(mean_k^b, noise_k^b / sigma_k) into `.grad`.

    `weights` (len(ks), B) carries the reward, baseline, batch mean and any subsampling weight.
    """
    dtype = traj.noises.dtype
    for rows, chunk in _chunks(ks, traj.batch_size, options.max_batch):
        with nvtx_range(f"likelihood ratio steps {chunk}"):
            idx = torch.as_tensor(chunk, device=traj.latents.device)
            scale = weights[rows].to(dtype) / traj.sigmas[idx].to(dtype)[:, None]
            cotangent = traj.noises[idx] * scale.reshape(scale.shape + (1,) * (traj.noises.dim() - 2))
            _backward_steps(model, traj, chunk, None, cotangent, options, counter)


def step_log_ratio(traj: Trajectory, ks: Sequence[int], mean: torch.Tensor, on_policy: bool = False) -> torch.Tensor:
    """log p_theta - log p_traj of the stored draws of steps `ks`, element by element (n, B, ...), given
    their recomputed means `mean` (n, B, ...): the log importance ratio of DDPO's and GRPO's surrogate
    (the trajectory's policy in the denominator), whose per-element mean they take as ddpo-pytorch does.
    It is computed as -n.d - d^2 / 2 with d = (mean_traj - mean) / sigma (the log sigma terms cancel),
    which stays exact in fp32 where differencing two log-densities would not. `on_policy`: the model is
    the one that sampled the chain, so mean_traj is `mean` itself, detached: the ratio is exactly 1 (no
    recomputation rounding) and its gradient the score of the stored draw."""
    idx = torch.as_tensor(list(ks), device=traj.latents.device)
    noise = traj.noises[idx]
    sigma = traj.sigmas[idx].to(noise.dtype).reshape((-1,) + (1,) * (noise.dim() - 1))
    # the draw's own mean is x_{t-1} - sigma noise
    mean_traj = mean.detach() if on_policy else traj.latents[idx + 1] - sigma * noise
    d = (mean_traj - mean) / sigma
    return -(noise * d) - 0.5 * d * d


def mean_objective(model, traj: Trajectory, ks: Sequence[int],
                   objective: Callable[[list[int], torch.Tensor, Any], torch.Tensor], options: EstimatorOptions,
                   counter: CallCounter, prepare: Optional[Callable[[list[int]], Any]] = None) -> None:
    """Back-propagate the scalar `objective(chunk, mean, prepared)` of the recomputed means (n, B, ...) of
    each chunk of the steps `ks` (max_batch) into `.grad`. `prepare(chunk)`, when given, runs before the
    chunk's forward with grad and its result is passed on as `prepared`: work without grad (GRPO's
    reference means) that is then never alive together with the policy's graph."""
    for _, chunk in _chunks(ks, traj.batch_size, options.max_batch):
        prepared = None if prepare is None else prepare(chunk)

        def cotangent(mean: torch.Tensor, chunk=chunk, prepared=prepared) -> torch.Tensor:
            mean = mean.detach().requires_grad_()
            with torch.enable_grad():
                (g,) = torch.autograd.grad(objective(chunk, mean, prepared), mean)
            return g

        with nvtx_range(f"objective of steps {chunk}"):
            _backward_steps(model, traj, chunk, None, cotangent, options, counter)


# ----------------------------------------------------------------------------------------------
# One step per sample, each its own (SQDF's drawn steps, states replayed from a buffer)


@dataclass
class StepStates:
    """Per sample b: `x[b]`, the input of step `steps[b]` (sampling order, 0 the noisiest) of a chain,
    and what recomputing that step needs: the chain's schedule and the sample's conditioning.
    """

    x: torch.Tensor  # (B, ...)
    steps: torch.Tensor  # (B,) int64
    schedule: StepSchedule  # the chain's per-step tables (T,), as in Trajectory
    encoder_hidden_states: Optional[torch.Tensor] = None  # (B, L, D)
    negative_encoder_hidden_states: Optional[torch.Tensor] = None  # (B, L, D), CFG only
    guidance_scale: float = 1.0

    @classmethod
    def of(cls, traj: Trajectory, steps: torch.Tensor) -> "StepStates":
        """Sample b of `traj` at step steps[b]."""
        steps = torch.as_tensor(steps, dtype=torch.int64, device=traj.latents.device)
        rows = torch.arange(traj.batch_size, device=steps.device)
        cond = traj.encoder_hidden_states
        if traj.prompt_index is not None:  # a prompt schedule: each sample's prompt at its own step
            cond = cond[traj.prompt_index.to(steps.device)[steps, rows]]
        return cls(traj.latents[steps, rows], steps, traj.schedule, cond, traj.negative_encoder_hidden_states,
                   traj.guidance_scale)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def uses_cfg(self) -> bool:
        return self.negative_encoder_hidden_states is not None and self.guidance_scale != 1.0

    def select(self, rows: torch.Tensor) -> "StepStates":
        """The samples `rows` (a boolean mask or indices)."""
        pick = (lambda c: None if c is None else c[rows])
        return dataclasses.replace(self, x=self.x[rows], steps=self.steps[rows],
                                   encoder_hidden_states=pick(self.encoder_hidden_states),
                                   negative_encoder_hidden_states=pick(self.negative_encoder_hidden_states))

    def own_steps(self) -> StepSchedule:
        """The schedule at every sample's own step: each table (B,)."""
        return self.schedule.at(self.steps)


def _guided(out: torch.Tensor, out_cond: Optional[torch.Tensor], w: float) -> torch.Tensor:
    return out if out_cond is None else out + w * (out_cond - out)


def state_step(model, states: StepStates, noise: Optional[torch.Tensor] = None, *, split_cfg: bool = False,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, mean) of every sample's own step, x_next = mean + sigma * noise (noise 0 if None),
    in the current grad mode."""
    own = states.own_steps()
    out, out_cond = predict(model, states.x, own.timesteps, states.encoder_hidden_states,
                            states.negative_encoder_hidden_states, states.guidance_scale, split_cfg)
    noise = torch.zeros_like(states.x) if noise is None else noise
    prev, mean, _ = ddim_step(states.x, out, noise, own.c_x, own.c_e, own.sigmas, model_output_cond=out_cond,
                              guidance_scale=states.guidance_scale, backend=backend)
    return prev, mean


def state_tweedie(model, states: StepStates, *, split_cfg: bool = False) -> torch.Tensor:
    """x0_hat = d_x x + d_e e of every sample's own step (e the guided model output), in the current grad mode."""
    own = states.own_steps()
    out, out_cond = predict(model, states.x, own.timesteps, states.encoder_hidden_states,
                            states.negative_encoder_hidden_states, states.guidance_scale, split_cfg)
    per_sample = (-1,) + (1,) * (states.x.dim() - 1)
    e = _guided(out, out_cond, states.guidance_scale)
    return own.d_x.to(e.dtype).reshape(per_sample) * states.x + own.d_e.to(e.dtype).reshape(per_sample) * e


def state_backward(model, states: StepStates, cotangent: torch.Tensor, options: EstimatorOptions,
                   counter: CallCounter, *, tweedie: bool = False) -> Optional[torch.Tensor]:
    """Back-propagate `cotangent` on every sample's step mean (or, with `tweedie`, its x0_hat):
    parameter gradients accumulate in `.grad` of whatever requires grad; returns d/dx of the states
    when `states.x` requires grad (None otherwise). Split guidance runs the halves one at a time."""
    x = states.x
    counter.forward_samples += states.batch_size
    counter.backward_samples += states.batch_size
    if options.split_cfg and states.uses_cfg:
        own = states.own_steps()
        a_x, a_e = (own.d_x, own.d_e) if tweedie else (own.c_x, own.c_e)
        _split_guidance_backward(model, x, own.timesteps, states.encoder_hidden_states,
                                 states.negative_encoder_hidden_states, states.guidance_scale, a_x, a_e, cotangent,
                                 counter)
    else:
        out = state_tweedie(model, states) if tweedie else state_step(model, states, backend=options.backend)[1]
        counter.forward += 1
        torch.autograd.backward(out, cotangent)
        counter.backward += 1
    return x.grad if x.requires_grad else None


# ----------------------------------------------------------------------------------------------
# Per-term gradient statistics


@dataclass
class GradTerms:
    """Norms of what each named term added to the parameter gradients (one host sync per term)."""

    params: list
    norms: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def term(self, name: str):
        before = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        yield
        added = [p.grad.detach() if b is None else p.grad.detach() - b
                 for p, b in zip(self.params, before) if p.grad is not None]
        norm = 0.0
        if added:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(added, 2, dtype=torch.float64))).item()
        self.norms[name] = self.norms.get(name, 0.0) + norm
