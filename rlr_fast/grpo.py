"""GRPO's objective: group-standardised advantages, a clipped per-element-mean ratio, a KL to the reference.

docs/estimator.md §8.5. Flow-GRPO (github.com/yifan123/flow_grpo) fine-tunes flow models this way;
here it runs on any sampler of rlr_fast.samplers. With A_b the advantage of sample b and S the
minibatch's trained steps (`trained_steps`), one estimate accumulates into `.grad` the gradient of

    L = 1 / (B |S|)  sum_b sum_{k in S}  [ max(-A_b r_bk, -A_b clip(r_bk, 1 - eps, 1 + eps)) + beta KL_bk ]
    r_bk  = exp( (log p_theta(x_{k+1} | x_k) - log p_traj(x_{k+1} | x_k)) / D )
    KL_bk = |mu_theta(x_k) - mu_ref(x_k)|^2 / (2 sigma_k^2 D)

D the latent's elements per sample: log-densities and the KL are per-element means, as Flow-GRPO's
and ddpo-pytorch's, so clip_range and grpo_beta are in their units (but see §8.5 on their KL's
scale). The reference is the base model: the policy with its LoRA switched off
(rlr_fast.sqdf.reference_policy), its means computed without grad before each chunk's forward.

The advantages standardise each reward within its prompt's group, A = (R - mean_g) / (std_g + 1e-4)
with the population std, as Flow-GRPO's per-prompt tracker (`group_advantages`). finetune's loop
(rlr_fast.ddpo.GRPOSteps) samples DDPO's epochs and takes the groups per rollout batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .baselines import ddpo_advantages
from .options import EstimatorOptions
from .rollout import Trajectory, recompute_steps
from .sqdf import reference_policy
from .sweep import CallCounter, mean_objective, step_log_ratio

GROUP_STD_EPS = 1e-4  # Flow-GRPO's: a group whose rewards are all equal gets advantages 0


def group_advantages(rewards: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R - mean_g) / (std_g + 1e-4) per sample (float64), g the samples of the same prompt id (the whole
    batch without `prompt_ids`), std the population one: DDPO's standardisation with Flow-GRPO's epsilon.
    A group of one sample gets advantage 0."""
    values = rewards.detach().double()
    if prompt_ids is not None:
        prompt_ids = torch.as_tensor(prompt_ids)
        if prompt_ids.shape != values.shape:
            raise ValueError(f"prompt_ids must have shape {tuple(values.shape)} (one per reward), got "
                             f"{tuple(prompt_ids.shape)}")
    return ddpo_advantages(values, prompt_ids, eps=GROUP_STD_EPS)


def trained_count(fraction: float, stochastic: int) -> int:
    """Steps a minibatch trains on out of its `stochastic` ones: floor(fraction x stochastic), at least one."""
    return max(1, int(fraction * stochastic + 1e-9))


def trained_steps(traj: Trajectory, options: EstimatorOptions, generator: Optional[torch.Generator]) -> list[int]:
    """The steps k (sampling order, ascending) one minibatch trains on: every stochastic step, or with
    grpo_step_fraction < 1 floor(fraction x their number) of them (at least one), drawn uniformly
    without replacement from `generator`, shared by the minibatch's samples."""
    stochastic = [k for k in range(traj.num_steps) if float(traj.sigmas[k]) > 0]
    if not stochastic:
        raise ValueError(f"{options.method} needs stochastic steps: every step of this trajectory has sigma = 0 "
                         "(raise eta)")
    count = trained_count(options.grpo_step_fraction, len(stochastic))
    if count == len(stochastic):
        return stochastic
    chosen = torch.randperm(len(stochastic), generator=generator)[:count]
    return sorted(stochastic[i] for i in chosen.tolist())


def reference_means(model, traj: Trajectory, ks: list[int], options: EstimatorOptions, counter: CallCounter,
                    reference=None) -> torch.Tensor:
    """The reference's means (n, B, ...) of steps `ks` at the stored inputs, without grad."""
    with torch.no_grad(), reference_policy(model, reference, method="grpo") as base:
        mean = recompute_steps(base, traj, ks, split_cfg=options.split_cfg, backend=options.backend)
    counter.forward += 2 if options.split_cfg and traj.uses_cfg else 1
    counter.forward_samples += len(ks) * traj.batch_size
    return mean


def grpo_objective(model, traj: Trajectory, advantages: torch.Tensor, options: EstimatorOptions,
                   counter: CallCounter, generator: Optional[torch.Generator] = None, reference=None,
                   on_policy: bool = False) -> dict:
    """Accumulate the gradient of L (module docstring) into `.grad`; `advantages` (B,). `on_policy`: the
    model sampled `traj`, so r = 1 exactly (rlr_fast.sweep.step_log_ratio). Returns stats:
    trained_steps (k), clip_fraction, ratio_max_deviation (max |r - 1|), approx_kl (half the mean
    squared per-element log-ratio, as DDPO logs it), kl_to_reference (mean KL_bk; None with
    grpo_beta = 0, which runs no reference) and unet_steps."""
    ks = trained_steps(traj, options, generator)
    elements = traj.latents[0, 0].numel()  # D
    eps, beta, count = options.clip_range, options.grpo_beta, len(ks) * traj.batch_size
    a = advantages.double()[None, :]
    clipped, deviation, squared, kls = [], [], [], []

    def objective(chunk: list[int], mean: torch.Tensor, mean_ref: Optional[torch.Tensor]) -> torch.Tensor:
        log_ratio = step_log_ratio(traj, chunk, mean, on_policy).double().flatten(2).mean(2)
        ratio = log_ratio.exp()
        off = (ratio.detach() - 1).abs()
        clipped.append((off > eps).sum())
        deviation.append(off.max())
        squared.append(log_ratio.detach().square().sum())
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)).sum()
        if mean_ref is not None:
            sigma = traj.sigmas[torch.as_tensor(chunk, device=traj.sigmas.device)].double()[:, None]
            kl = (mean - mean_ref).double().flatten(2).square().sum(2) / (2 * sigma ** 2 * elements)
            kls.append(kl.detach().sum())
            loss = loss + beta * kl.sum()
        return loss / count

    prepare = None if beta == 0 else (lambda chunk: reference_means(model, traj, chunk, options, counter, reference))
    mean_objective(model, traj, ks, objective, options, counter, prepare)
    return {"trained_steps": ks, "clip_fraction": float(torch.stack(clipped).sum()) / count,
            "ratio_max_deviation": float(torch.stack(deviation).max()),
            "approx_kl": 0.5 * float(torch.stack(squared).sum()) / count,
            "kl_to_reference": float(torch.stack(kls).sum()) / count if kls else None, "unet_steps": len(ks)}
