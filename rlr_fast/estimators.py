"""Gradient estimators for E[R(x_0)] through a sampling chain, as docs/estimator.md specifies them.

Every estimator accumulates into `.grad` an estimate of the gradient of
loss = -mean_b R(x_0^b), so `optimizer.step()` raises the reward.

Steps are named as in docs/estimator.md: t = 1 .. T, t = 1 the last (x_1 -> x_0). Each step's
gradient contribution g_t has two unbiased estimators given the stored chain:
  pathwise           VJP of mu_t with the cotangent dR/dx_{t-1}, back-propagated from x_0
  likelihood ratio   VJP of mu_t with the cotangent (R - b) eps_t / sigma_t
RLR, full backprop, truncated backprop and the pure likelihood-ratio estimator differ only in
which steps get which term (F pathwise, H a half-order sub-chain, C likelihood ratios): one `Terms`
plan, chosen by rlr_fast.terms and run here by `run_terms`.
DDPO (a clipped importance-ratio surrogate), GRPO (rlr_fast.grpo: DDPO's surrogate per latent element, with
group advantages and a KL to the base model) and SQDF (rlr_fast.sqdf: a one-step gradient at one
drawn step per sample) are separate. `estimate` checks its arguments and dispatches; the rewards are
scored by rlr_fast.scoring, the model runs in rlr_fast.sweep, baselines and scales come from
rlr_fast.baselines, and every option is validated by rlr_fast.options.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from .baselines import ValueStatistics, ddpo_advantages, proxy_rewards, reward_baseline, reward_scale, value_baseline
from .distributed import Ranks
from .grpo import group_advantages, grpo_objective
from .options import EstimatorOptions
from .profiling import nvtx_range
from .rollout import Trajectory, model_key
from .scoring import CountedReward, RewardFn, chain_rewards, reward_stats
from .sqdf import estimate_fresh_chain
from .sweep import (CallCounter, GradTerms, SavedTensorMemory, gradient_checkpointing, likelihood_ratio,
                    pathwise_sweep, resident_tensors, trainable_parameters)
from .terms import Terms, choose_terms, likelihood_ratio_steps


# the methods whose estimate is a clipped importance ratio of stored samples, given or computed advantages
RATIO_METHODS = ("ddpo", "grpo")


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
    those of `rlr_fast.sqdf.estimate_states`
    (its rewards are R(x_0) of the chain, scored once more than the soft Q).
    """
    options = EstimatorOptions.build(options, **overrides)
    params = _check_call(model, traj, options, advantages, on_policy, reference, value_state)
    group = Ranks() if group is None else group
    reward_fn = None if reward_fn is None else CountedReward(reward_fn)
    if prompt_ids is not None:
        prompt_ids = group.gather(torch.as_tensor(prompt_ids), "gathering the batch's prompt ids")
    if options.method == "sqdf":
        return estimate_fresh_chain(model, traj, reward_fn, options, generator, group, reference, track_memory)
    return _estimate_chain(model, params, traj, reward_fn, options, generator, prompt_ids, advantages, group,
                           value_state, reference, on_policy, track_memory)


def _check_call(model, traj, options: EstimatorOptions, advantages, on_policy: bool, reference, value_state) -> list:
    """`estimate`'s arguments against each other, each mismatch one line naming it; the model's trainable
    parameters."""
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a Trajectory from rlr_fast.rollout, got {type(traj).__name__}")
    options.check_chain(traj.num_steps, traj.eta)
    params = trainable_parameters(model)
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


def _estimate_chain(model, params: list, traj: Trajectory, reward_fn, options: EstimatorOptions, generator,
                    prompt_ids, advantages, group: Ranks, value_state, reference, on_policy: bool,
                    track_memory: bool) -> dict:
    """Every method but sqdf on a stored chain: its rewards (or given advantages), then its terms or its
    clipped ratio (ddpo, grpo) back-propagated into .grad; the stats `estimate` returns."""
    surrogate = options.method in RATIO_METHODS
    terms = None if surrogate else choose_terms(traj, options, generator)
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


def _stats(method: str, rewards: Optional[torch.Tensor], terms: Optional[Terms]) -> dict:
    j, h = (None, 0) if terms is None or terms.half_order is None else terms.half_order
    return {
        "method": method,
        **reward_stats(rewards),
        "j": j,
        "F": [] if terms is None else list(range(1, terms.first_order + 1)),
        "H": [] if j is None else list(range(j + 1, j + h + 1)),
        "C": [] if terms is None else list(terms.zeroth_order),
        "zo_weight": None if terms is None else terms.zo_weight,
        "unet_steps": None if terms is None else terms.first_order + h + len(terms.zeroth_order),
    }
