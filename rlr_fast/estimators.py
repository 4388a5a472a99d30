"""Gradient estimators for E[R(x_0)] through a sampling chain, as docs/estimator.md specifies them.

Every estimator accumulates into `.grad` an estimate of the gradient of
loss = -mean_b R(x_0^b), so `optimizer.step()` raises the reward.

Steps are named as in docs/estimator.md: t = 1 .. T, t = 1 the last (x_1 -> x_0). Each step's
gradient contribution g_t has two unbiased estimators given the stored chain:
  pathwise           VJP of mu_t with the cotangent dR/dx_{t-1}, back-propagated from x_0
  likelihood ratio   VJP of mu_t with the cotangent (R - b) eps_t / sigma_t
RLR, full backprop, truncated backprop and the pure likelihood-ratio estimator differ only in
which steps get which term, so all four are one `Terms` plan run by `run_terms`:
  F = {1..f}       pathwise from dR/dx_0 (sigma_t = 0 steps must be here or in H)
  H = {j+1..j+h}   likelihood ratio at step j+1, back-propagated through steps j+2..j+h
  C = the rest     likelihood ratio per step, optionally k of |C| with weight |C| / k
DDPO (a clipped importance-ratio surrogate), GRPO (rlr_fast.grpo: DDPO's surrogate per latent element, with
group advantages and a KL to the base model) and SQDF (rlr_fast.sqdf: a one-step gradient at one
drawn step per sample, `estimate_states`) are separate. This module builds the terms; the model
runs in rlr_fast.sweep, baselines and scales come from rlr_fast.baselines, and every option is
validated by rlr_fast.options.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .baselines import ValueStatistics, ddpo_advantages, proxy_rewards, reward_baseline, reward_scale, value_baseline
from .distributed import Ranks
from .grpo import group_advantages, grpo_objective
from .options import EstimatorOptions
from .profiling import nvtx_range
from .rollout import Trajectory, model_key
from .sqdf import draw_steps, sqdf_gradient
from .sweep import (CallCounter, GradTerms, SavedTensorMemory, StepStates, gradient_checkpointing,
                    likelihood_ratio, pathwise_sweep, resident_tensors)

RewardFn = Callable[[torch.Tensor], torch.Tensor]


# the methods whose estimate is a clipped importance ratio of stored samples, given or computed advantages
RATIO_METHODS = ("ddpo", "grpo")


@dataclass
class Terms:
    """Which steps (docs/estimator.md indices t) get which estimator term."""

    first_order: int = 0  # f: pathwise over t = 1..f
    half_order: Optional[tuple[int, int]] = None  # (j, h): the sub-chain t = j+1..j+h
    zeroth_order: list[int] = field(default_factory=list)  # C, after any subsampling
    zo_weight: Union[float, list[float]] = 1.0  # |C| / k, or one weight per step of C with aim_steps


# ------------------------------------------------------------------------------------------
# Rewards


class CountedReward:
    """`reward_fn` counting what it did: every image it scored, and those scored with grad enabled on an
    input that requires grad (their dR/dx0 is taken)."""

    def __init__(self, reward_fn: RewardFn):
        self.reward_fn = reward_fn
        self.images = self.backward_images = 0

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        self.images += x0.shape[0]
        if x0.requires_grad and torch.is_grad_enabled():
            self.backward_images += x0.shape[0]
        return self.reward_fn(x0)

    def counts(self) -> dict:
        return {"reward_images": self.images, "reward_backward_images": self.backward_images}


class NonFiniteRewards(ValueError):
    """A reward of the batch is NaN or Inf, so no gradient is estimated from it (on any rank)."""


def chain_rewards(reward_fn: RewardFn, traj: Trajectory, need_grad: bool, group: Ranks = Ranks()):
    """R(x_0) (B,), the whole batch's rewards (all ranks' in rank order: `group.gather`) and, when
    `need_grad`, dR/dx_0; the reward's graph is freed before returning.

    Computing dR/dx_0 first (phase one) and sweeping the model afterwards (phase two) means the
    reward's activations and the model's are never alive together. Finiteness is checked on the
    whole batch, so every rank refuses the same batch.
    """
    return _score(reward_fn, traj.x0, need_grad, group)


def _score(reward_fn: RewardFn, x0: torch.Tensor, need_grad: bool, group: Ranks = Ranks()):
    """R(x0) (B,) of latents x0, the whole batch's, and when `need_grad` dR/dx0 (see `chain_rewards`)."""
    batch = x0.shape[0]
    x0 = x0.detach().requires_grad_(need_grad)
    with nvtx_range("reward"), torch.set_grad_enabled(need_grad):
        r = reward_fn(x0)
    if not torch.is_tensor(r) or r.shape != (batch,):
        raise ValueError(f"reward_fn must return a tensor of shape ({batch},) (one reward "
                         f"per sample), got {getattr(r, 'shape', type(r).__name__)}")
    everyone = group.gather(r.detach())
    bad = int((~torch.isfinite(everyone)).sum())
    if bad:
        raise NonFiniteRewards(f"{bad} of {everyone.numel()} rewards are not finite (NaN or Inf); "
                               "no gradient was applied")
    if not need_grad:
        return r.detach(), everyone, None
    if r.grad_fn is None:
        raise ValueError("this estimator needs dR/dx0 but the reward is not differentiable "
                         "(its output has no gradient path to x0); use method='zo' or 'ddpo', "
                         "or method='rlr' with first_order_steps=0")
    (dr,) = torch.autograd.grad(r.sum(), x0)  # rewards are per sample: d(sum R)/dx0_b = dR_b/dx0_b
    return r.detach(), everyone, dr


# ------------------------------------------------------------------------------------------
# Step sets. The options were validated against T already; what is checked here depends on
# the trajectory itself: which of its steps are deterministic (sigma = 0).


def deterministic_steps(traj: Trajectory) -> list[int]:
    """docs/estimator.md indices t of steps with sigma_t = 0."""
    return [traj.math_step(k) for k in range(traj.num_steps) if float(traj.sigmas[k]) == 0.0]


def valid_js(traj: Trajectory, f: int, h: int) -> list[int]:
    """Start indices j of the half-order sub-chain for which RLR is defined.

    j in {f..T-h} such that step j+1 (closed by a likelihood ratio) has sigma > 0 and no
    sigma = 0 step falls in C.
    """
    det = set(deterministic_steps(traj))
    return [j for j in range(f, traj.num_steps - h + 1)
            if j + 1 not in det and all(t <= f or j + 1 <= t <= j + h for t in det)]


def _draw(generator: Optional[torch.Generator], n: int) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def aimed_steps(num_steps: int, aim: Optional[tuple[float, float]]) -> set[int]:
    """The math steps t whose code index k = T - t has from <= k / T < to (a prompt_schedule segment's
    rule); empty without an aim."""
    if aim is None:
        return set()
    return {num_steps - k for k in range(num_steps) if aim[0] <= k / num_steps < aim[1]}


def j_distribution(valid: list[int], h: int, aimed: set[int], share: float) -> torch.Tensor:
    """q(j) over `valid`: `share` spread evenly on the j whose sub-chain j+1..j+h meets the aimed
    steps, the rest on all valid j (uniform when none meets them). Any q is unbiased (§4.2)."""
    q = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
    hits = torch.tensor([any(j + i in aimed for i in range(1, h + 1)) for j in valid])
    if hits.any():
        q = (1 - share) * q + share * hits.double() / hits.sum()
    return q


def _choose_j(j, valid: list[int], generator, aim: Optional[tuple[int, set[int], float]] = None) -> int:
    if aim is not None:
        return valid[int(torch.multinomial(j_distribution(valid, *aim), 1, generator=generator))]
    if j == "uniform":
        return valid[_draw(generator, len(valid))]
    if isinstance(j, int):
        if j not in valid:
            raise ValueError(f"j={j} is not a valid start for this trajectory's deterministic steps "
                             f"(valid: {valid})")
        return j
    weights = torch.as_tensor(j, dtype=torch.float64)  # a weight per j = 0 .. len - 1
    outside = [i for i in range(weights.numel()) if weights[i] > 0 and i not in valid]
    if outside:
        raise ValueError(f"j weights must be zero outside the valid j {valid} of this trajectory; "
                         f"got weight on {outside}")
    return int(torch.multinomial(weights, 1, generator=generator))


def _subsample(steps: list[int], k: Optional[int], generator) -> tuple[list[int], float]:
    """k of the steps uniformly without replacement, each weighted |C| / k (unbiased)."""
    if k is None or k == len(steps):
        return steps, 1.0
    perm = torch.randperm(len(steps), generator=generator)[:k]
    return sorted(steps[i] for i in perm.tolist()), len(steps) / k


def _aimed_subsample(steps: list[int], k: Optional[int], aimed: set[int], share: float,
                     generator) -> tuple[list[int], Union[float, list[float]]]:
    """k of the steps, about `share` of them among the aimed ones: uniform without replacement within
    the aimed and the other steps (k_a and k - k_a of them, both >= 1), each weighted by the inverse of
    its chance to be drawn, |A| / k_a or |B| / k_b (with k = 1: one group drawn with chance share,
    then one step of it), so the sum stays unbiased (docs/estimator.md §12.1)."""
    inside = [t for t in steps if t in aimed]
    outside = [t for t in steps if t not in aimed]
    if k is None or k == len(steps) or not inside or not outside:
        return _subsample(steps, k, generator)
    if k == 1:
        group, chance = (inside, share) if float(torch.rand((), generator=generator, dtype=torch.float64)) < share \
            else (outside, 1 - share)
        return [group[_draw(generator, len(group))]], [len(group) / chance]
    k_in = min(max(round(share * k), 1), k - 1, len(inside))
    k_in = k - min(k - k_in, len(outside))
    chosen = {}
    for group, n in ((inside, k_in), (outside, k - k_in)):
        for t in _subsample(group, n, generator)[0]:
            chosen[t] = len(group) / n
    ts = sorted(chosen)
    return ts, [chosen[t] for t in ts]


def rlr_terms(traj: Trajectory, options: EstimatorOptions, generator=None) -> Terms:
    """F, H and C of one RLR estimate."""
    T, f, h = traj.num_steps, options.first_order_steps, options.h
    valid = valid_js(traj, f, h)
    if not valid:
        raise ValueError(f"no valid j for first_order_steps={f}, h={h}: deterministic steps (sigma=0) "
                         f"t={deterministic_steps(traj)} must lie in F = 1..f or H, and step j+1 needs sigma > 0; "
                         "raise first_order_steps (or eta)")
    aimed = aimed_steps(T, options.aim_steps)
    j = _choose_j(options.j, valid, generator, (h, aimed, options.aim_share) if aimed else None)
    rest = [t for t in range(1, T + 1) if t > f and not j + 1 <= t <= j + h]
    chosen, weight = _aimed_subsample(rest, options.zo_steps, aimed, options.aim_share, generator)
    return Terms(first_order=f, half_order=(j, h), zeroth_order=chosen, zo_weight=weight)


def zo_terms(traj: Trajectory, options: EstimatorOptions, generator=None) -> Terms:
    """Likelihood ratio on every step above the last deterministic one, pathwise below it."""
    f = max(deterministic_steps(traj), default=0)
    stochastic = list(range(f + 1, traj.num_steps + 1))
    if options.zo_steps is not None and options.zo_steps > len(stochastic):
        raise ValueError(f"zo_steps={options.zo_steps} exceeds the {len(stochastic)} steps after this "
                         f"trajectory's last deterministic step (t={f})")
    chosen, weight = _aimed_subsample(stochastic, options.zo_steps, aimed_steps(traj.num_steps, options.aim_steps),
                                      options.aim_share, generator)
    return Terms(first_order=f, zeroth_order=chosen, zo_weight=weight)


def _terms(traj: Trajectory, options: EstimatorOptions, generator) -> Terms:
    if options.method == "rlr":
        return rlr_terms(traj, options, generator)
    if options.method == "zo":
        return zo_terms(traj, options, generator)
    if options.method == "full_bp":
        return Terms(first_order=traj.num_steps)
    # truncated_bp: pathwise over the last K steps only (AlignProp / DRaFT-K): biased, for comparison
    k = options.truncated_bp_k
    return Terms(first_order=1 + _draw(generator, traj.num_steps) if k == "random" else k)


# ------------------------------------------------------------------------------------------
# Running the terms


def run_terms(model, traj: Trajectory, terms: Terms, dr: Optional[torch.Tensor], adv: torch.Tensor,
               options: EstimatorOptions, counter: CallCounter, grads: GradTerms) -> None:
    """Accumulate F, H and C of `terms`: `adv` (T, B) = -(R - b_k) / (B s) for step k, `dr` = -dR/dx_0 / (B s)."""
    if terms.first_order:
        with grads.term("first_order"), nvtx_range("first-order term"):
            pathwise_sweep(model, traj, traj.step_index(1), traj.step_index(terms.first_order), dr, options, counter)
    if terms.half_order is not None:
        j, h = terms.half_order
        k_close = traj.step_index(j + 1)  # the segment's last step: closed by its likelihood ratio
        sigma = traj.sigmas[k_close].to(traj.noises.dtype)
        per_sample = (-1,) + (1,) * (traj.noises.dim() - 2)
        cot = traj.noises[k_close] * (adv[k_close].to(sigma.dtype) / sigma).reshape(per_sample)
        with grads.term("half_order"), nvtx_range("half-order term"):
            pathwise_sweep(model, traj, k_close, traj.step_index(j + h), cot, options, counter)
    if terms.zeroth_order:
        ks = [traj.step_index(t) for t in terms.zeroth_order]
        weights = adv[ks] * (torch.as_tensor(terms.zo_weight, dtype=adv.dtype, device=adv.device).reshape(-1, 1)
                             if isinstance(terms.zo_weight, list) else terms.zo_weight)
        with grads.term("zeroth_order"), nvtx_range("zeroth-order terms"):
            likelihood_ratio(model, traj, ks, weights, options, counter)


def likelihood_ratio_steps(traj: Trajectory, terms: Terms) -> list[int]:
    """Steps k (ascending) that carry a likelihood ratio: C, and the closing step j+1 of H."""
    ts = list(terms.zeroth_order) + ([terms.half_order[0] + 1] if terms.half_order is not None else [])
    return sorted(traj.step_index(t) for t in ts)


def _advantages(reward_fn: RewardFn, traj: Trajectory, terms: Terms, everyone: torch.Tensor, options: EstimatorOptions,
                prompt_ids, value_state: Optional[ValueStatistics], group: Ranks) -> tuple[torch.Tensor, dict]:
    """-(R - b_k) / B per step k and sample of this rank's B, (T, B), and the baseline's stats.

    Baselines are fitted on the whole batch: `everyone`'s rewards (all ranks') and, for the value
    baseline, every rank's proxy rewards. Rows of steps without a likelihood ratio are NaN under the
    value baseline, which computes b_k only where a term needs it.
    """
    T, B = traj.num_steps, traj.batch_size
    rewards = group.mine(everyone)
    if options.baseline != "value":
        return (-(rewards - group.mine(reward_baseline(everyone, options, prompt_ids))) / B).expand(T, -1), {}
    ks = likelihood_ratio_steps(traj, terms)
    adv = torch.full((T, B), float("nan"), dtype=rewards.dtype, device=rewards.device)
    if not ks:
        return adv, {"value_fallbacks": 0, "reward_forward": 0}
    if traj.x0_hat is None:
        raise ValueError("baseline='value' scores each step's x0 estimate, which this trajectory does not hold: "
                         "roll out with rlr_fast.rollout(..., store_x0_hat=True)")
    with nvtx_range("value baseline"):
        surrogate = options.value_proxy == "surrogate"
        local_q = value_state.surrogate.predict(traj.x0_hat[ks]) if surrogate else proxy_rewards(reward_fn,
                                                                                                   traj.x0_hat, ks)
        q = group.gather(local_q.T, "gathering the value baseline's proxy rewards").T
        running = options.value_fit == "running"
        history = value_state.history(T, ks) if running else None
        b, fallbacks = value_baseline(q, everyone, history)
        if running:  # after the fit: the batch enters the baselines of later estimates only
            value_state.update(T, ks, q, everyone, options.value_decay)
        if surrogate:  # likewise the surrogate's regression, on the whole batch's (x0, R)
            value_state.surrogate.update(group.gather(traj.x0.detach(), "gathering x0 for the surrogate"),
                                         everyone, options.value_decay)
    adv[ks] = (-(rewards.double() - group.mine(b.T).T) / B).to(rewards.dtype)
    return adv, {"value_fallbacks": fallbacks, "reward_forward": 0 if surrogate else len(ks)}


def _ddpo(model, traj: Trajectory, advantages: torch.Tensor, options: EstimatorOptions,
          counter: CallCounter, on_policy: bool) -> dict:
    """DDPO's clipped surrogate: mean over samples and stochastic steps of
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = p_theta(x_{t-1} | x_t) / p_traj(x_{t-1} | x_t) with
    per-element-mean log-densities as ddpo-pytorch (docs/estimator.md §8): GRPO's objective without
    its KL term, on every stochastic step. Stats: clip_fraction, ratio_max_deviation, approx_kl (as
    ddpo-pytorch logs it: half the mean squared log-ratio) and unet_steps."""
    plain = dataclasses.replace(options, grpo_beta=0.0, grpo_step_fraction=1.0)
    stats = grpo_objective(model, traj, advantages, plain, counter, on_policy=on_policy)
    return {k: stats[k] for k in ("clip_fraction", "ratio_max_deviation", "approx_kl", "unet_steps")}


# ------------------------------------------------------------------------------------------
# The public entry point


def _trainable(model) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False); "
                         "add LoRA (rlr_fast.lora.add_lora) or unfreeze some parameters")
    return params


def estimate(model, traj: Trajectory, reward_fn: RewardFn, options: Optional[EstimatorOptions] = None, *,
             generator: Optional[torch.Generator] = None, prompt_ids=None, advantages=None,
             group: Optional[Ranks] = None, value_state: Optional[ValueStatistics] = None, reference=None,
             on_policy: bool = False, track_memory: bool = False, **overrides) -> dict:
    """Accumulate into `.grad` an estimate of the gradient of -mean_b R(x_0^b) (for sqdf: of its
    KL-regularised loss, docs/estimator.md §11).

    options     an `EstimatorOptions` (or a `Config`: its estimator fields); `overrides` are field
                names of EstimatorOptions (method="rlr", h=2, baseline="loo", truncated_bp_k=4, ...)
                applied on top and validated with them
    generator   draws j, the zeroth-order subsample, a random K, grpo's trained steps, and sqdf's steps and
                fresh noise; same state -> same estimate
    prompt_ids  (B,) prompt of each sample: baseline="loo_prompt" and DDPO's and GRPO's per-prompt advantages
    advantages  ddpo and grpo only: (B,) advantages instead of the rewards standardised within each
                prompt's samples; the reward is then not evaluated and `reward_fn` may be None (a
                minibatch of samples whose rewards were taken when they were drawn)
    group       the ranks of a data-parallel run (rlr_fast.distributed.Ranks), each holding a slice
                of the batch: rewards, prompt ids and the value baseline's proxy rewards are
                all-gathered, so baselines, value fits, normalize's scale and ddpo's advantages are
                the whole batch's; each rank estimates from its own samples, and the ranks' mean
                .grad is the whole batch's estimate
    value_state baseline="value" with value_fit="running" or value_proxy="surrogate": the `ValueStatistics`
                of earlier estimates (their value fit, their surrogate regression), used for this
                estimate's baselines and then updated with this batch (the whole batch's, so it stays
                the same on every rank)
    reference   sqdf and grpo (grpo_beta > 0) only: the base model as a frozen module (default: `model` with
                its LoRA switched off)
    on_policy   ddpo and grpo with advantages: `model` is the policy that sampled `traj` (no optimizer step
                since), so the importance ratio is 1 exactly (without advantages the samples are scored now
                and this holds already): the first minibatches of an epoch
    track_memory  measure the peak bytes saved for backward (stats["peak_saved_bytes"])

    Returns stats: method, reward_mean/std, rewards (the whole batch's with a group; None when not
    evaluated), j, F/H/C (docs/estimator.md step indices), zo_weight, unet_forward, unet_backward
    (model calls), unet_steps (steps recomputed with grad, each a forward and a backward of the batch),
    reward_forward (reward_fn calls on the batch: R(x_0) and, with baseline="value", one per
    likelihood-ratio step), reward_backward (0 or 1: dR/dx_0), unet_forward_samples,
    unet_backward_samples (sample-steps, docs/estimator.md §7), reward_images (every image reward_fn
    scored on this rank: R(x_0), the value baseline's x0_hat proxies, sqdf's soft Q and its record of
    R(x_0)), reward_backward_images (images whose dR/dx_0 was taken), reward_queries (images whose
    reward the objective takes: R(x_0), sqdf's soft Q; no proxies), term_norms, peak_saved_bytes, for
    ddpo clip_fraction, ratio_max_deviation (max |r - 1|) and approx_kl (per-element-mean log-ratios), for
    grpo also trained_steps and kl_to_reference (rlr_fast.grpo), with baseline="value" value_fallbacks
    (step-sample baselines that fell back to a mean reward: too few pairs or no spread of q), and for sqdf
    those of `estimate_states`
    (its rewards are R(x_0) of the chain, scored once more than the soft Q).
    """
    options = EstimatorOptions.build(options, **overrides)
    params = _check_call(model, traj, options, advantages, on_policy, reference, value_state)
    group = Ranks() if group is None else group
    reward_fn = None if reward_fn is None else CountedReward(reward_fn)
    if prompt_ids is not None:
        prompt_ids = group.gather(torch.as_tensor(prompt_ids), "gathering the batch's prompt ids")
    if options.method == "sqdf":
        return _estimate_sqdf(model, traj, reward_fn, options, generator, group, reference, track_memory)
    return _estimate_chain(model, params, traj, reward_fn, options, generator, prompt_ids, advantages, group,
                           value_state, reference, on_policy, track_memory)


def _check_call(model, traj, options: EstimatorOptions, advantages, on_policy: bool, reference, value_state) -> list:
    """`estimate`'s arguments against each other, each mismatch one line naming it; the model's trainable
    parameters."""
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a Trajectory from rlr_fast.rollout, got {type(traj).__name__}")
    options.check_chain(traj.num_steps, traj.eta)
    params = _trainable(model)
    if traj.model_key and traj.model_key != model_key(model):
        raise ValueError("this trajectory was sampled by a model of another architecture "
                         f"(fingerprint {traj.model_key}, this model {model_key(model)}); roll out again")
    surrogate = options.method in RATIO_METHODS
    if advantages is not None and not surrogate:
        raise ValueError(f"advantages are used by method='ddpo' and 'grpo' only, not by method={options.method!r}")
    if on_policy and (not surrogate or advantages is None):
        raise ValueError("on_policy is for method='ddpo' given advantages, or 'grpo' (a minibatch of an epoch); "
                         "without them the samples are scored now and taken as on-policy already")
    if reference is not None and options.method not in ("sqdf", "grpo"):
        raise ValueError(f"reference is used by method='sqdf' and 'grpo' only, not by method={options.method!r}")
    needs_state = options.needs_value_state
    if needs_state and not isinstance(value_state, ValueStatistics):
        raise ValueError("baseline='value' with value_fit='running' or value_proxy='surrogate' needs value_state="
                         f"rlr_fast.ValueStatistics() (kept across estimates), got {type(value_state).__name__}")
    if value_state is not None and not needs_state:
        raise ValueError("value_state is used by baseline='value' with value_fit='running' or value_proxy='surrogate' "
                         f"(method rlr or zo) only; got method={options.method!r}, baseline={options.baseline!r}, "
                         f"value_fit={options.value_fit!r}")
    return params


def _estimate_sqdf(model, traj: Trajectory, reward_fn, options: EstimatorOptions, generator, group: Ranks,
                   reference, track_memory: bool) -> dict:
    """SQDF on a fresh chain: a step per sample drawn, then `estimate_states`; R(x_0) scored for the record."""
    steps = draw_steps(options, traj.sigmas, traj.batch_size, generator).to(traj.latents.device)
    _, rewards, _ = chain_rewards(reward_fn, traj, False, group)  # the chain's own, for the record
    stats = estimate_states(model, StepStates.of(traj, steps), reward_fn, options, generator=generator,
                            reference=reference, track_memory=track_memory)
    return dict(stats, **_reward_stats(rewards), reward_queries=stats["reward_queries"] + traj.batch_size,
                reward_forward=stats["reward_forward"] + 1, **reward_fn.counts())


def _estimate_chain(model, params: list, traj: Trajectory, reward_fn, options: EstimatorOptions, generator,
                    prompt_ids, advantages, group: Ranks, value_state, reference, on_policy: bool,
                    track_memory: bool) -> dict:
    """Every method but sqdf on a stored chain: its rewards (or given advantages), then its terms or its
    clipped ratio (ddpo, grpo) back-propagated into .grad; the stats `estimate` returns."""
    surrogate = options.method in RATIO_METHODS
    terms = None if surrogate else _terms(traj, options, generator)
    rewards = everyone = dr = None
    advantages_given = advantages is not None
    if surrogate and advantages_given:
        advantages = torch.as_tensor(advantages, dtype=torch.float64, device=traj.latents.device)
        if advantages.shape != (traj.batch_size,):
            raise ValueError(f"advantages must have shape ({traj.batch_size},), got {tuple(advantages.shape)}")
    else:
        rewards, everyone, dr = chain_rewards(reward_fn, traj, terms is not None and terms.first_order > 0, group)
        if surrogate:
            standardise = ddpo_advantages if options.method == "ddpo" else group_advantages
            advantages = group.mine(standardise(everyone, prompt_ids))
    memory = SavedTensorMemory(exclude=resident_tensors(model, traj)) if track_memory else None
    counter, grads, extra = CallCounter(), GradTerms(params), {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(gradient_checkpointing(model, options.checkpoint_unet))
        if memory is not None:
            stack.enter_context(memory.track())
        if options.method == "grpo":
            extra = grpo_objective(model, traj, advantages, options, counter, generator, reference,
                                   not advantages_given or on_policy)
        elif terms is None:
            extra = _ddpo(model, traj, advantages, options, counter, not advantages_given or on_policy)
        else:
            adv, extra = _advantages(reward_fn, traj, terms, everyone, options, prompt_ids, value_state, group)
            s, b = reward_scale(everyone, options), traj.batch_size
            dr = None if dr is None else -dr / (b * s)
            with grads.term("total"):
                run_terms(model, traj, terms, dr, adv / s, options, counter, grads)
    extra["reward_forward"] = int(rewards is not None) + extra.get("reward_forward", 0)
    return dict(_stats(options.method, everyone, terms), unet_forward=counter.forward,
                unet_backward=counter.backward, reward_backward=int(dr is not None),
                unet_forward_samples=counter.forward_samples, unet_backward_samples=counter.backward_samples,
                reward_queries=0 if rewards is None else traj.batch_size, term_norms=grads.norms,
                peak_saved_bytes=None if memory is None else memory.peak, **extra,
                **(CountedReward(None) if reward_fn is None else reward_fn).counts())


def _local_score(reward_fn: RewardFn):
    """x0 -> (R(x0), dR/dx0) of this process's samples, as `sqdf_gradient` takes the soft Q."""
    def score(x0: torch.Tensor):
        r, _, dr = _score(reward_fn, x0, True)
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
        raise TypeError(f"states must be rlr_fast.sweep.StepStates, got {type(states).__name__}")
    params = _trainable(model)
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


def _reward_stats(rewards: Optional[torch.Tensor]) -> dict:
    if rewards is None:
        return {"reward_mean": None, "reward_std": None, "rewards": None}
    return {"reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "rewards": rewards.tolist()}


def _stats(method: str, rewards: Optional[torch.Tensor], terms: Optional[Terms]) -> dict:
    j, h = (None, 0) if terms is None or terms.half_order is None else terms.half_order
    return {
        "method": method,
        **_reward_stats(rewards),
        "j": j,
        "F": [] if terms is None else list(range(1, terms.first_order + 1)),
        "H": [] if j is None else list(range(j + 1, j + h + 1)),
        "C": [] if terms is None else list(terms.zeroth_order),
        "zo_weight": None if terms is None else terms.zo_weight,
        "unet_steps": None if terms is None else terms.first_order + h + len(terms.zeroth_order),
    }
