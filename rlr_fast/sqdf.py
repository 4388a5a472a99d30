"""SQDF: a reparameterised one-step gradient of a training-free soft Q, KL-regularised to the base model.

docs/estimator.md §11. Per sample b, at a stored state x_k of a chain (a fresh rollout, or a chain
replayed from `rlr_fast.replay`), with k drawn from `sqdf_steps`:

    x'     = mu_theta(x_k) + sigma_k e,   e ~ N(0, I) fresh                   (reparameterised)
    Q      = R(x0_hat(x')): the base model's Tweedie estimate at step k+1, x' itself at the last step
    KL     = ||mu_theta(x_k) - mu_ref(x_k)||^2 / (2 sigma_k^2)                  (summed over elements)
    loss   = mean_b -(gamma^n_b Q_b - alpha KL_b),   n_b = T - 1 - k_b
    (with sqdf_reward_mask, the public code's: each sample's term times [Q_b > 0])

x0_estimator="consistency" takes x0_hat from a latent consistency model instead (rlr_fast.consistency).

The base model is the same UNet with its LoRA adapters switched off (no second copy of the weights).
The update runs in phases whose activations are never alive together, so its peak is the largest of
one UNet step, the VAE and reward, and it does not depend on T:

  1. no grad: mu_theta(x_k), mu_ref(x_k), x', x0_hat
  2. the reward phase: Q and dQ/dx0_hat (VAE decode and reward, forward and backward)
  3. the base model's step at k+1 with grad to its input only: dQ/dx'
  4. the policy's step at k with grad: the cotangent -(gamma^n dQ/dx' - alpha (mu_theta - mu_ref) / sigma^2) / B
     on mu_theta, back-propagated into the LoRA

Steps 1 and 3 recompute what the other computed once more (one more forward each) instead of keeping
a graph alive through the reward phase.

This module holds all of SQDF: `StepStates` (one stored state per sample, each at its own step) and the
step over them (`state_step`, `state_tweedie`, `state_backward`), the steps drawn, the KL to the base
model, `sqdf_gradient`, and the two estimates: `estimate_fresh_chain` (method='sqdf' of
rlr_fast.estimate, on a fresh rollout) and `estimate_states` (given states, e.g. replayed from
rlr_fast.replay).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .ddim import ddim_step
from .distributed import Ranks
from .options import EstimatorOptions
from .profiling import nvtx_range
from .rollout import Trajectory, predict
from .samplers import StepSchedule
from .scoring import CountedReward, RewardFn, chain_rewards, reward_stats, score_latents
from .sweep import (CallCounter, GradTerms, SavedTensorMemory, gradient_checkpointing, split_guidance_backward,
                    trainable_parameters)


# ----------------------------------------------------------------------------------------------
# Step states: one step per sample, each its own (SQDF's drawn steps, states replayed from a buffer)


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
        split_guidance_backward(model, x, own.timesteps, states.encoder_hidden_states,
                                states.negative_encoder_hidden_states, states.guidance_scale, a_x, a_e, cotangent,
                                counter)
    else:
        out = state_tweedie(model, states) if tweedie else state_step(model, states, backend=options.backend)[1]
        counter.forward += 1
        torch.autograd.backward(out, cotangent)
        counter.backward += 1
    return x.grad if x.requires_grad else None


# x0_estimator(reference, states) -> x0_hat (B, ...): an estimate of x_0 from states.x, the input of
# step states.steps[b] of the chain, differentiable in states.x. `reference` is the base model.
X0Estimator = Callable[[torch.nn.Module, StepStates], torch.Tensor]
# score(x0_hat) -> (Q (B,), dQ/dx0_hat): the reward phase, its graph freed before it returns.
Score = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# The steps SQDF draws, the base model, the KL to it


@contextlib.contextmanager
def reference_policy(model: torch.nn.Module, reference: Optional[torch.nn.Module] = None, method: str = "sqdf"
                     ) -> Iterator[torch.nn.Module]:
    """The base model: `reference` when given (its parameters must be frozen), else `model` with its
    LoRA adapters switched off for the duration (every requires_grad flag restored afterwards).
    `method` names the caller in errors (sqdf, grpo)."""
    if reference is not None:
        if any(p.requires_grad for p in reference.parameters()):
            raise ValueError(f"reference must be frozen (requires_grad=False on every parameter): method={method!r} "
                             "trains the policy only")
        yield reference
        return
    from .lora import has_lora, lora_disabled  # peft loads only when SQDF runs

    if not has_lora(model):
        raise ValueError(f"method={method!r} compares the policy with the base model: {type(model).__name__} has no "
                         "LoRA adapters to switch off (add them with rlr_fast.lora.add_lora), and no "
                         "reference= module was given")
    with lora_disabled(model):
        yield model


def step_range(options: EstimatorOptions, num_steps: int) -> tuple[int, int]:
    """[first, stop) of the steps SQDF draws from (every step when `sqdf_steps` is None)."""
    first, stop = options.sqdf_steps if options.sqdf_steps is not None else (0, num_steps)
    if stop > num_steps:
        raise ValueError(f"sqdf_steps={[first, stop]} reaches past the chain's {num_steps} steps")
    return first, stop


def stochastic_steps(sigmas: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """The steps of [first, stop) with sigma > 0, the ones SQDF draws (a deterministic step has no
    reparameterised noise and no KL); an error naming the range when there are none."""
    steps = torch.arange(first, stop)[sigmas[first:stop].cpu() > 0]
    if not len(steps):
        raise ValueError(f"sqdf_steps={[first, stop]} holds no stochastic step (sigma > 0), and sqdf draws only "
                         "those: widen sqdf_steps or raise eta")
    return steps


def draw_steps(options: EstimatorOptions, sigmas: torch.Tensor, batch: int,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """One step k per sample, uniform on the stochastic steps of `sqdf_steps` (drawn on the CPU from
    `generator`)."""
    steps = stochastic_steps(sigmas, *step_range(options, sigmas.shape[0]))
    return steps[torch.randint(len(steps), (batch,), generator=generator)]


def _calls(options: EstimatorOptions, states: StepStates) -> int:
    return 2 if options.split_cfg and states.uses_cfg else 1


def _means(model, states: StepStates, noise: Optional[torch.Tensor], options: EstimatorOptions,
           reference, counter: CallCounter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Without grad: (x', mu_theta, mu_ref) of every sample's step."""
    with torch.no_grad():
        moved, mean = state_step(model, states, noise, split_cfg=options.split_cfg, backend=options.backend)
        with reference_policy(model, reference) as base:
            _, mean_ref = state_step(base, states, split_cfg=options.split_cfg, backend=options.backend)
    counter.forward += 2 * _calls(options, states)
    counter.forward_samples += 2 * states.batch_size
    return moved, mean, mean_ref


def _kl(mean: torch.Tensor, mean_ref: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (mean - mean_ref).double().flatten(1).pow(2).sum(1) / (2 * sigma.double() ** 2)


def kl_to_base(model, states: StepStates, options: EstimatorOptions, *, reference=None,
               counter: Optional[CallCounter] = None) -> torch.Tensor:
    """KL(p_theta(. | x_k) || p_base(. | x_k)) of every sample's step, (B,) float64, without grad."""
    sigma = states.own_steps().sigmas
    _, mean, mean_ref = _means(model, states, None, options, reference, counter or CallCounter())
    return _kl(mean, mean_ref, sigma)


def chain_kl(model, traj: Trajectory, generator: torch.Generator, options: EstimatorOptions, *,
             reference=None) -> torch.Tensor:
    """Per sample, an unbiased estimate of KL(p_theta || p_base) of its whole chain, (B,) float64:
    S KL_k(x_k) at one of the chain's S stochastic steps k drawn uniformly, since the chain's KL is
    sum_k E[KL_k(x_k)] over them. Two UNet calls of B samples (policy and base model), no grad."""
    stochastic = torch.nonzero(traj.sigmas > 0).flatten().cpu()
    if not len(stochastic):
        raise ValueError("every step of this chain is deterministic (sigma = 0): it has no KL to report")
    steps = stochastic[torch.randint(len(stochastic), (traj.batch_size,), generator=generator)]
    return len(stochastic) * kl_to_base(model, StepStates.of(traj, steps), options, reference=reference)



# ----------------------------------------------------------------------------------------------
# The soft Q's gradient


def _estimator(model, options: EstimatorOptions) -> Optional[X0Estimator]:
    """None for Tweedie (`state_tweedie`, back-propagated by `state_backward`), else the x0 estimator to call."""
    if options.x0_estimator == "tweedie":
        return None
    if options.x0_estimator == "consistency":
        from .consistency import consistency_of  # diffusers' LCMScheduler and peft load only when used

        return consistency_of(model)
    return options.x0_estimator


def _x0(reference, states: StepStates, estimator: Optional[X0Estimator], options: EstimatorOptions,
        counter: CallCounter) -> torch.Tensor:
    if estimator is not None:
        return estimator(reference, states)
    counter.forward += _calls(options, states)
    counter.forward_samples += states.batch_size
    return state_tweedie(reference, states, split_cfg=options.split_cfg)


def _x0_input_gradient(reference, states: StepStates, cotangent: torch.Tensor, estimator: Optional[X0Estimator],
                       options: EstimatorOptions, counter: CallCounter) -> torch.Tensor:
    """The VJP of x0_hat(states.x) with `cotangent`, with respect to states.x only."""
    x = states.x.detach().requires_grad_()
    states = dataclasses.replace(states, x=x)
    with torch.enable_grad():
        if estimator is None:  # the Tweedie step, its guidance halves one at a time with split_cfg
            return state_backward(reference, states, cotangent, options, counter, tweedie=True)
        (grad,) = torch.autograd.grad(estimator(reference, states), x, cotangent)
    return grad


def sqdf_gradient(model, states: StepStates, noise: torch.Tensor, score: Score, options: EstimatorOptions,
                  counter: CallCounter, *, reference=None) -> dict:
    """Accumulate into `.grad` the gradient of loss = mean_b -(gamma^n_b Q_b - alpha KL_b) at the given
    states and fresh noise (B, ...); returns Q, KL and the discount weight of every sample, (B,) each."""
    batch, last_step = states.batch_size, states.num_steps - 1
    sigma = states.own_steps().sigmas
    if bool((sigma == 0).any()):
        raise ValueError(f"sqdf needs sigma > 0 at every drawn step; steps {states.steps[sigma == 0].tolist()} are "
                         "deterministic")
    estimator = _estimator(model, options)
    with nvtx_range("sqdf: means"):
        moved, mean, mean_ref = _means(model, states, noise, options, reference, counter)
    inner = states.steps < last_step  # these take x0_hat from the next step; the last step's x' is x_0
    after = dataclasses.replace(states.select(inner), x=moved[inner], steps=states.steps[inner] + 1)
    x0 = moved.clone()
    if after.batch_size:
        with torch.no_grad(), reference_policy(model, reference) as base, nvtx_range("sqdf: x0 estimate"):
            x0[inner] = _x0(base, after, estimator, options, counter).to(x0.dtype)
    with nvtx_range("sqdf: reward"):
        q, dq = score(x0)
    grad_moved = dq.clone()
    if after.batch_size:
        with reference_policy(model, reference) as base, nvtx_range("sqdf: x0 estimate backward"):
            grad_moved[inner] = _x0_input_gradient(base, after, dq[inner], estimator, options, counter)
    per_sample = (-1,) + (1,) * (moved.dim() - 1)
    weight = options.sqdf_gamma ** (last_step - states.steps).double()
    s2 = (sigma.double() ** 2).reshape(per_sample)
    cotangent = (-weight.reshape(per_sample) * grad_moved + options.sqdf_alpha * (mean - mean_ref) / s2) / batch
    if options.sqdf_reward_mask:  # the public code's rewards > 0: both terms of a sample with Q <= 0 dropped
        cotangent = cotangent * (q > 0).to(cotangent.dtype).reshape(per_sample)
    with nvtx_range("sqdf: policy step backward"):
        state_backward(model, dataclasses.replace(states, x=states.x.detach()), cotangent.to(moved.dtype), options,
                       counter)
    return {"q": q, "kl": _kl(mean, mean_ref, sigma), "weight": weight}


# ----------------------------------------------------------------------------------------------
# The estimates


def estimate_fresh_chain(model, traj: Trajectory, reward_fn: CountedReward, options: EstimatorOptions, generator,
                         group: Ranks, reference, track_memory: bool) -> dict:
    """method='sqdf' of `rlr_fast.estimate` on a fresh chain: a step per sample drawn, then `estimate_states`;
    R(x_0) scored for the record."""
    steps = draw_steps(options, traj.sigmas, traj.batch_size, generator).to(traj.latents.device)
    _, rewards, _ = chain_rewards(reward_fn, traj, False, group)  # the chain's own, for the record
    stats = estimate_states(model, StepStates.of(traj, steps), reward_fn, options, generator=generator,
                            reference=reference, track_memory=track_memory)
    return dict(stats, **reward_stats(rewards), reward_queries=stats["reward_queries"] + traj.batch_size,
                reward_forward=stats["reward_forward"] + 1, **reward_fn.counts())


def _local_score(reward_fn: RewardFn):
    """x0 -> (R(x0), dR/dx0) of this process's samples, as `sqdf_gradient` takes the soft Q."""
    def score(x0: torch.Tensor):
        r, _, dr = score_latents(reward_fn, x0, True)
        return r, dr
    return score


def estimate_states(model, states: StepStates, reward_fn: RewardFn, options: Optional[EstimatorOptions] = None, *,
                    generator: Optional[torch.Generator] = None, reference=None, track_memory: bool = False,
                    **overrides) -> dict:
    """SQDF at given states, one step per sample (drawn by `estimate`, or replayed from a buffer):
    accumulate into `.grad` the gradient of mean_b -(gamma^n_b Q_b - alpha KL_b) (docs/estimator.md §11).

    The fresh noise of the reparameterised step is drawn from `generator`. Returns stats: method,
    k (each sample's step, sampling order), q / kl (each sample's soft Q and KL), q_mean, kl_mean,
    unet_forward, unet_backward, unet_steps (steps recomputed with grad per sample: the policy's, and the base model's
    at k+1 for dQ/dx' unless k is the last), reward_forward
    (1: the soft Q), reward_backward (1), unet_forward_samples, unet_backward_samples, reward_queries,
    reward_images, reward_backward_images, term_norms and peak_saved_bytes.
    """
    options = EstimatorOptions.build(options, **overrides)
    if options.method != "sqdf":
        raise ValueError(f"estimate_states runs method='sqdf', got method={options.method!r}; the other "
                         "methods take a whole chain: use estimate")
    if not isinstance(states, StepStates):
        raise TypeError(f"states must be rlr_fast.sqdf.StepStates, got {type(states).__name__}")
    params = trainable_parameters(model)
    reward_fn = CountedReward(reward_fn)
    device = states.x.device if generator is None else generator.device
    noise = torch.randn(states.x.shape, generator=generator, device=device, dtype=states.x.dtype).to(states.x.device)
    cond = [states.encoder_hidden_states, states.negative_encoder_hidden_states]
    memory = SavedTensorMemory(exclude=list(model.parameters()) + list(model.buffers()) + [states.x, noise]
                               + [c for c in cond if c is not None]) if track_memory else None
    counter, grads = CallCounter(), GradTerms(params)
    with contextlib.ExitStack() as stack:
        stack.enter_context(gradient_checkpointing(model, options.checkpoint_unet))
        if memory is not None:
            stack.enter_context(memory.track())
        with grads.term("total"):
            out = sqdf_gradient(model, states, noise, _local_score(reward_fn), options,
                                counter, reference=reference)
    return {"method": "sqdf", "k": states.steps.tolist(), "q": out["q"].tolist(), "kl": out["kl"].tolist(),
            "q_mean": float(out["q"].mean()), "kl_mean": float(out["kl"].mean()), "unet_forward": counter.forward,
            "unet_backward": counter.backward, "unet_forward_samples": counter.forward_samples,
            "unet_backward_samples": counter.backward_samples, "reward_queries": states.batch_size,
            "unet_steps": counter.backward_samples / states.batch_size, "reward_forward": 1, "reward_backward": 1,
            "term_norms": grads.norms, "peak_saved_bytes": None if memory is None else memory.peak,
            **reward_fn.counts()}
