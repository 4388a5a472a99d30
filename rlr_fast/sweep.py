"""Reverse sweeps and likelihood-ratio chunks over recomputed steps: where the chain estimators run the model.

The rollout stored x_T .. x_0 and every step's noise, so no term needs more than one step's
activations (docs/estimator.md, the memory argument). A pathwise term starts from a cotangent on
one step's mean, recomputes that step from its stored input with grad enabled, back-propagates
(parameter gradients accumulate in `.grad`, the input's gradient becomes the next cotangent),
frees it and moves one step back. Likelihood-ratio steps need no input gradient and are
independent: each chunk of them runs in one model call with per-sample timesteps, one step's
batch per call unless `max_batch` asks for more (activation memory then grows with the chunk).

With guidance and `split_cfg`, the mean c_x x + c_e ((1 - w) e_u + w e_c) is linear in the two
model outputs, so the cotangent of each is known before it is computed: the unconditional and
conditional passes run and back-propagate one after the other, and only one half's graph is alive
(`split_guidance_backward`, which SQDF's one step per sample in rlr_fast.sqdf runs too).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from .options import EstimatorOptions
from .profiling import nvtx_range
from .rollout import Trajectory, predict, recompute_steps, stacked_inputs

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
        split_guidance_backward(model, x, t, cond, negative, traj.guidance_scale, c_x, c_e, cotangent, counter)
        return
    mean = recompute_steps(model, traj, ks, sample, backend=options.backend)
    counter.forward += 1
    if callable(cotangent):
        cotangent = cotangent(mean.detach())
    torch.autograd.backward(mean, cotangent)
    counter.backward += 1


def split_guidance_backward(model, x: torch.Tensor, t: torch.Tensor, cond, negative, w: float, a_x: torch.Tensor,
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
# The trained parameters and what each term added to their gradients


def trainable_parameters(model) -> list:
    """The parameters an estimate accumulates `.grad` into; an error when the model has none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False); "
                         "add LoRA (rlr_fast.lora.add_lora) or unfreeze some parameters")
    return params


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
