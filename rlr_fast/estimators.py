"""Gradient estimators for E[R(x_0)] through a sampling chain; `rlr_math.md` sections 2, 3 and 5.

Every estimator accumulates into `.grad` an estimate of the gradient of
loss = -mean_b R(x_0^b), so `optimizer.step()` raises the reward.

Steps are named here as in `rlr_math.md`: t = 1 .. T, t = 1 the last (x_1 -> x_0). Each step's
gradient contribution g_t has two unbiased estimators given the stored chain:
  pathwise           VJP of mu_t with the cotangent dR/dx_{t-1}, back-propagated from x_0
  likelihood ratio   VJP of mu_t with the cotangent (R - b) eps_t / sigma_t
RLR, full backprop, truncated backprop and the pure likelihood-ratio estimator differ only in
which steps get which term, so all four are one `Terms` plan run by `_run_terms`:
  F = {1..f}       pathwise from dR/dx_0 (sigma_t = 0 steps must be here or in H)
  H = {j+1..j+h}   likelihood ratio at step j+1, back-propagated through steps j+2..j+h
  C = the rest     likelihood ratio per step, optionally k of |C| with weight |C| / k
DDPO (a clipped importance-ratio surrogate) is separate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .profiling import nvtx_range
from .rollout import Trajectory, model_key, recompute_steps
from .sweep import (CallCounter, GradTerms, SavedTensorMemory, SweepOptions, gradient_checkpointing,
                    likelihood_ratio, pathwise_sweep)

METHODS = ("rlr", "full_bp", "truncated_bp", "zo", "ddpo")
RewardFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Terms:
    """Which steps (rlr_math indices t) get which estimator term."""

    first_order: int = 0  # f: pathwise over t = 1..f
    half_order: Optional[tuple[int, int]] = None  # (j, h): the sub-chain t = j+1..j+h
    zeroth_order: list[int] = field(default_factory=list)  # C, after any subsampling
    zo_weight: float = 1.0  # |C| / k


# ------------------------------------------------------------------------------------------
# Rewards, baselines and scales


def _rewards(reward_fn: RewardFn, traj: Trajectory, need_grad: bool):
    """R(x_0) (B,) and, when `need_grad`, dR/dx_0; the reward's graph is freed before returning.

    Computing dR/dx_0 first (phase one) and sweeping the model afterwards (phase two) means the
    reward's activations and the model's are never alive together.
    """
    x0 = traj.x0.detach().requires_grad_(need_grad)
    with nvtx_range("reward"), torch.set_grad_enabled(need_grad):
        r = reward_fn(x0)
    if not torch.is_tensor(r) or r.shape != (traj.batch_size,):
        raise ValueError(f"reward_fn must return a tensor of shape ({traj.batch_size},) (one reward "
                         f"per sample), got {getattr(r, 'shape', type(r).__name__)}")
    bad = int((~torch.isfinite(r.detach())).sum())
    if bad:
        raise ValueError(f"{bad} of {traj.batch_size} rewards are not finite (NaN or Inf); "
                         "no gradient was applied")
    if not need_grad:
        return r.detach(), None
    if r.grad_fn is None:
        raise ValueError("this estimator needs dR/dx0 but the reward is not differentiable "
                         "(its output has no gradient path to x0); use method='zo' or 'ddpo', "
                         "or method='rlr' with first_order_steps=0")
    (dr,) = torch.autograd.grad(r.sum(), x0)  # rewards are per sample: d(sum R)/dx0_b = dR_b/dx0_b
    return r.detach(), dr


def _baseline(rewards: torch.Tensor, baseline, prompt_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """b per sample, independent of that sample's own noise (so the estimate stays unbiased)."""
    n = rewards.numel()
    if baseline in (None, "none"):
        return torch.zeros_like(rewards)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(rewards, float(baseline))
    if baseline == "loo":
        if n < 2:
            raise ValueError("baseline='loo' (leave-one-out) needs a batch of at least 2 samples")
        return (rewards.sum() - rewards) / (n - 1)
    if baseline == "loo_prompt":
        if prompt_ids is None or prompt_ids.shape != rewards.shape:
            raise ValueError("baseline='loo_prompt' needs prompt_ids, one id per sample "
                             f"(shape ({n},)), got {None if prompt_ids is None else tuple(prompt_ids.shape)}")
        ids = prompt_ids.to(rewards.device)
        same = ids[:, None] == ids[None, :]
        count = same.sum(1) - 1
        if (count == 0).any():
            raise ValueError("baseline='loo_prompt' needs at least 2 samples of every prompt in the batch")
        return ((same * rewards[None, :]).sum(1) - rewards) / count
    raise ValueError(f"unknown baseline {baseline!r}; use 'none', 'loo', 'loo_prompt' or a number")


def _scale(rewards: torch.Tensor, normalize) -> float:
    """s dividing every term. A batch std is a slightly biased choice (rlr_math.md, section 3)."""
    if normalize is False or normalize is None:
        return 1.0
    if normalize is True:
        s = float(rewards.std()) if rewards.numel() > 1 else 1.0
        return s if s > 1e-8 else 1.0
    if not float(normalize) > 0:
        raise ValueError(f"normalize must be True/False or a positive scale, got {normalize!r}")
    return float(normalize)


# ------------------------------------------------------------------------------------------
# Step sets


def _deterministic(traj: Trajectory) -> list[int]:
    """rlr_math indices t of steps with sigma_t = 0."""
    return [traj.math_step(k) for k in range(traj.num_steps) if float(traj.sigmas[k]) == 0.0]


def valid_js(traj: Trajectory, f: int, h: int) -> list[int]:
    """Start indices j of the half-order sub-chain for which RLR is defined.

    j in {f..T-h} such that step j+1 (closed by a likelihood ratio) has sigma > 0 and no
    sigma = 0 step falls in C.
    """
    T = traj.num_steps
    det = set(_deterministic(traj))
    out = []
    for j in range(f, T - h + 1):
        if j + 1 in det:
            continue
        if all(t <= f or j + 1 <= t <= j + h for t in det):
            out.append(j)
    return out


def _draw(generator: Optional[torch.Generator], n: int) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def _choose_j(j, valid: list[int], generator) -> int:
    if isinstance(j, bool):
        raise TypeError(f"j must be an int, 'uniform' or a weight per j, got {j!r}")
    if isinstance(j, int):
        if j not in valid:
            raise ValueError(f"j={j} is outside the valid range {valid[0]}..{valid[-1]} "
                             f"(valid: {valid})")
        return j
    if j in (None, "uniform"):
        return valid[_draw(generator, len(valid))]
    weights = torch.as_tensor(j, dtype=torch.float64).flatten()  # a weight per j = 0 .. len - 1
    bad = [i for i in range(weights.numel()) if weights[i] > 0 and i not in valid]
    if weights.numel() == 0 or bad or not (weights >= 0).all() or weights.sum() <= 0:
        raise ValueError(f"j weights must be >= 0, positive somewhere, and zero outside the valid j "
                         f"{valid}; got weight on {bad or 'nothing valid'}")
    return int(torch.multinomial(weights, 1, generator=generator))


def rlr_terms(traj: Trajectory, *, first_order_steps: int = 1, h: int = 2, j="uniform",
              zo_steps: Optional[int] = None, generator=None) -> Terms:
    """F, H and C of one RLR estimate (rlr_math.md section 3)."""
    T, f = traj.num_steps, first_order_steps
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ValueError(f"first_order_steps must be an int >= 0, got {f!r}")
    if not isinstance(h, int) or isinstance(h, bool) or h < 1:
        raise ValueError(f"h must be an int >= 1, got {h!r}")
    if f + h > T:
        raise ValueError(f"first_order_steps + h = {f} + {h} exceeds the {T} steps of the trajectory")
    valid = valid_js(traj, f, h)
    if not valid:
        raise ValueError(f"no valid j for first_order_steps={f}, h={h}: deterministic steps (sigma=0) "
                         f"t={_deterministic(traj)} must lie in F = 1..f or H, and step j+1 needs sigma > 0; "
                         "raise first_order_steps (or eta)")
    jj = _choose_j(j, valid, generator)
    rest = [t for t in range(1, T + 1) if t > f and not jj + 1 <= t <= jj + h]
    chosen, weight = _subsample(rest, zo_steps, generator)
    return Terms(first_order=f, half_order=(jj, h), zeroth_order=chosen, zo_weight=weight)


def _subsample(steps: list[int], k: Optional[int], generator) -> tuple[list[int], float]:
    """k of the steps uniformly without replacement, each weighted |C| / k (unbiased)."""
    if k is None or k == len(steps):
        return steps, 1.0
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(steps):
        raise ValueError(f"zo_steps must be an int in 1..|C| = 1..{len(steps)}, got {k!r}")
    perm = torch.randperm(len(steps), generator=generator)[:k]
    return sorted(steps[i] for i in perm.tolist()), len(steps) / k


def zo_terms(traj: Trajectory, *, zo_steps: Optional[int] = None, generator=None) -> Terms:
    """Likelihood ratio on every step above the last deterministic one, pathwise below it."""
    f = max(_deterministic(traj), default=0)
    chosen, weight = _subsample(list(range(f + 1, traj.num_steps + 1)), zo_steps, generator)
    return Terms(first_order=f, zeroth_order=chosen, zo_weight=weight)


def truncated_terms(traj: Trajectory, *, k: Union[int, str] = 1, generator=None) -> Terms:
    """Pathwise over the last K steps only (AlignProp / DRaFT-K): biased, for comparison."""
    T = traj.num_steps
    if k == "random":
        k = 1 + _draw(generator, T)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T:
        raise ValueError(f"truncated_bp k must be an int in 1..{T} or 'random', got {k!r}")
    return Terms(first_order=k)


# ------------------------------------------------------------------------------------------
# Running a plan


def _run_terms(model, traj: Trajectory, terms: Terms, dr: Optional[torch.Tensor], adv: torch.Tensor,
               opts: SweepOptions, counter: CallCounter, grads: GradTerms) -> None:
    """Accumulate F, H and C of `terms`: `adv` (B,) = -(R - b) / (B s), `dr` = -dR/dx_0 / (B s)."""
    if terms.first_order:
        with grads.term("first_order"), nvtx_range("first-order term"):
            pathwise_sweep(model, traj, traj.step_index(1), traj.step_index(terms.first_order), dr, opts, counter)
    if terms.half_order is not None:
        j, h = terms.half_order
        k_close = traj.step_index(j + 1)  # the segment's last step: closed by its likelihood ratio
        sigma = traj.sigmas[k_close].to(traj.noises.dtype)
        cot = traj.noises[k_close] * (adv / sigma).reshape((-1,) + (1,) * (traj.noises.dim() - 2))
        with grads.term("half_order"), nvtx_range("half-order term"):
            pathwise_sweep(model, traj, k_close, traj.step_index(j + h), cot, opts, counter)
    if terms.zeroth_order:
        ks = [traj.step_index(t) for t in terms.zeroth_order]
        weights = (adv * terms.zo_weight).expand(len(ks), -1)
        with grads.term("zeroth_order"), nvtx_range("zeroth-order terms"):
            likelihood_ratio(model, traj, ks, weights, opts, counter)


def _ddpo(model, traj: Trajectory, rewards: torch.Tensor, prompt_ids, *, advantages=None,
          clip_range: float = 1e-4, opts: SweepOptions, counter: CallCounter) -> dict:
    """DDPO's clipped surrogate: mean over samples and stochastic steps of
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = p_theta(x_{t-1} | x_t) / p_traj(x_{t-1} | x_t).

    The behaviour policy is the trajectory's. log r is computed as -n.d - |d|^2 / 2 with
    d = (mu_traj - mu_theta) / sigma (the D log sigma terms cancel), so it stays exact in fp32
    where differencing two summed log-densities of ~10^4 elements would not.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if advantages is None:
        advantages = _normalised_advantages(rewards, prompt_ids)
    advantages = torch.as_tensor(advantages, dtype=rewards.dtype, device=rewards.device)
    if advantages.shape != rewards.shape:
        raise ValueError(f"advantages must have shape {tuple(rewards.shape)}, got {tuple(advantages.shape)}")
    ks = [k for k in range(traj.num_steps) if float(traj.sigmas[k]) > 0]
    if not ks:
        raise ValueError("ddpo needs stochastic steps (eta > 0): every step of this trajectory has sigma = 0")
    b = traj.batch_size
    per_call = max(1, (opts.max_batch or len(ks) * b) // b)
    clipped = 0
    for start in range(0, len(ks), per_call):
        chunk = ks[start:start + per_call]
        idx = torch.as_tensor(chunk, device=traj.latents.device)
        counter.forward += counter.calls_per_step
        mean = recompute_steps(model, traj, chunk, split_cfg=opts.split_cfg, backend=opts.backend)
        sig = traj.sigmas[idx].to(mean.dtype).reshape((-1,) + (1,) * (mean.dim() - 1))
        mean_traj = traj.latents[idx + 1] - sig * traj.noises[idx]
        d = (mean_traj - mean) / sig
        log_ratio = (-(traj.noises[idx] * d) - 0.5 * d * d).double().flatten(2).sum(2)  # (n, B)
        ratio = log_ratio.exp()
        a = advantages.double()[None, :]
        surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
        loss = surrogate.sum() / (len(ks) * b)
        loss.backward()
        counter.backward += counter.calls_per_step
        clipped += int(((ratio - 1).abs() > clip_range).sum())
    return {"clip_fraction": clipped / (len(ks) * b)}


def _normalised_advantages(rewards: torch.Tensor, prompt_ids) -> torch.Tensor:
    """Per-prompt (or whole-batch) standardised rewards, as DDPO uses."""
    if prompt_ids is None:
        groups = [torch.arange(rewards.numel(), device=rewards.device)]
    else:
        ids = prompt_ids.to(rewards.device)
        groups = [torch.nonzero(ids == v).flatten() for v in ids.unique()]
    adv = torch.zeros_like(rewards)
    for g in groups:
        r = rewards[g]
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv[g] = (r - r.mean()) / (std + 1e-8)
    return adv


# ------------------------------------------------------------------------------------------
# The public entry point


def _resident(model, traj: Trajectory) -> list:
    """Tensors alive before and after an update: not activations, so not counted as such."""
    cond = [traj.encoder_hidden_states, traj.negative_encoder_hidden_states]
    return (list(model.parameters()) + list(model.buffers()) + [traj.latents, traj.noises]
            + [c for c in cond if c is not None])


def estimate(model, traj: Trajectory, reward_fn: RewardFn, *, method: str = "rlr", generator=None,
             first_order_steps: int = 1, h: int = 2, j="uniform", zo_steps: Optional[int] = None,
             baseline="none", prompt_ids: Optional[torch.Tensor] = None, normalize=False,
             k: Union[int, str] = 1, advantages=None, clip_range: float = 1e-4,
             max_batch: Optional[int] = None, checkpoint: bool = False, split_cfg: bool = False,
             backend: str = "auto", track_memory: bool = False) -> dict:
    """Accumulate into `.grad` an estimate of the gradient of -mean_b R(x_0^b).

    method      "rlr" | "full_bp" | "truncated_bp" | "zo" | "ddpo" (rlr_math.md sections 3, 5)
    generator   draws j and the zeroth-order subsample; same state -> bit-identical estimate
    first_order_steps, h, j, zo_steps   RLR's f, h, j (int, "uniform", or a weight per j) and k of |C|
    baseline    "none" | "loo" (leave-one-out over the batch) | "loo_prompt" (per prompt_ids) | float
    normalize   divide every term, the first-order one included, by the batch reward std (True,
                slightly biased) or by a given positive scale
    k           truncated_bp: the K last steps back-propagated, or "random"
    advantages, clip_range   ddpo: advantages (default per-prompt standardised rewards), PPO clip
    max_batch   samples per model call in likelihood-ratio chunks (memory vs speed)
    checkpoint  per-block gradient checkpointing in each recomputed step (diffusers models)
    split_cfg   run guidance's two passes as separate calls (half the activations)
    track_memory  measure the peak bytes saved for backward (stats["peak_saved_bytes"])

    Returns stats: reward_mean/std, rewards, j, F/H/C (rlr_math step indices), unet_forward,
    unet_backward, term_norms, peak_saved_bytes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a Trajectory from rlr_fast.rollout, got {type(traj).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False); "
                         "add LoRA (rlr_fast.models.add_lora) or unfreeze some parameters")
    if traj.model_key and traj.model_key != model_key(model):
        raise ValueError("this trajectory was sampled by a model of another architecture "
                         f"(fingerprint {traj.model_key}, this model {model_key(model)}); roll out again")
    if prompt_ids is not None:
        prompt_ids = torch.as_tensor(prompt_ids)
    opts = SweepOptions(max_batch=max_batch, checkpoint=checkpoint, split_cfg=split_cfg, backend=backend)
    counter = CallCounter(calls_per_step=2 if (split_cfg and traj.uses_cfg) else 1)

    if method == "rlr":
        terms = rlr_terms(traj, first_order_steps=first_order_steps, h=h, j=j, zo_steps=zo_steps,
                          generator=generator)
    elif method == "full_bp":
        terms = Terms(first_order=traj.num_steps)
    elif method == "truncated_bp":
        terms = truncated_terms(traj, k=k, generator=generator)
    elif method == "zo":
        terms = zo_terms(traj, zo_steps=zo_steps, generator=generator)
    else:
        terms = None

    need_grad = terms is not None and terms.first_order > 0
    rewards, dr = _rewards(reward_fn, traj, need_grad)
    memory = SavedTensorMemory(exclude=_resident(model, traj)) if track_memory else None
    grads = GradTerms(params)
    extra = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(gradient_checkpointing(model, checkpoint))
        if memory is not None:
            stack.enter_context(memory.track())
        if terms is None:
            extra = _ddpo(model, traj, rewards, prompt_ids, advantages=advantages, clip_range=clip_range,
                          opts=opts, counter=counter)
        else:
            s = _scale(rewards, normalize)
            b = traj.batch_size
            adv = -(rewards - _baseline(rewards, baseline, prompt_ids)) / (b * s)
            dr = None if dr is None else -dr / (b * s)
            with grads.term("total"):
                _run_terms(model, traj, terms, dr, adv, opts, counter, grads)

    stats = {
        "method": method,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "rewards": rewards.tolist(),
        "j": None if terms is None or terms.half_order is None else terms.half_order[0],
        "F": [] if terms is None else list(range(1, terms.first_order + 1)),
        "H": [] if terms is None or terms.half_order is None
        else list(range(terms.half_order[0] + 1, terms.half_order[0] + terms.half_order[1] + 1)),
        "C": [] if terms is None else list(terms.zeroth_order),
        "zo_weight": None if terms is None else terms.zo_weight,
        "unet_forward": counter.forward,
        "unet_backward": counter.backward,
        "term_norms": grads.norms,
        "peak_saved_bytes": None if memory is None else memory.peak,
    }
    stats.update(extra)
    return stats



def naive_backprop(model, traj: Trajectory, reward_fn: RewardFn, *, track_memory: bool = False) -> dict:
    """Full backprop as one autograd graph over the whole chain: the comparison baseline.

    Re-runs the T steps from x_T with the stored noises and grad enabled, then back-propagates
    once, so every step's activations are alive together (memory grows linearly in T). Same
    gradient as `estimate(method="full_bp")`; use that instead.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    memory = SavedTensorMemory(exclude=_resident(model, traj))
    with memory.track() if track_memory else contextlib.nullcontext():
        x = traj.latents[0]
        for k in range(traj.num_steps):
            mean = recompute_steps(model, traj, [k], x.unsqueeze(0))[0]
            x = mean + traj.sigmas[k].to(mean.dtype) * traj.noises[k]
        r = reward_fn(x)
        (-r.mean()).backward()
    return {"reward_mean": float(r.detach().mean()), "unet_forward": traj.num_steps,
            "unet_backward": traj.num_steps, "peak_saved_bytes": memory.peak if track_memory else None}
