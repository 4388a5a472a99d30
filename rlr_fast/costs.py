"""What one gradient estimate costs: the one place that turns EstimatorOptions at T into work.

    w = work(EstimatorOptions(method="rlr", h=2, baseline="value"), num_steps=10)
    w.pathwise, w.likelihood_ratio, w.reward_images        # 3 steps, 7 steps, 9 images per sample
    CostModel().forward_equivalents(w, checkpoint_unet=False)  # UNet forward-equivalents per sample

Every count is per sample of the batch (multiply by B for the batch) and is what `estimate` does
from a fresh rollout (docs/estimator.md §7): the planner (rlr_fast.plan), the design search
(rlr_fast.design), the training records and the benchmarks read it; tests/test_costs.py checks it
against counted model and reward calls. Where a method draws its work (truncated_bp's random K,
sqdf's step), the counts are expectations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .grpo import trained_count
from .options import EstimatorOptions


@dataclass(frozen=True)
class Work:
    """One estimate's work per sample, besides its rollout of `rollout` UNet forwards."""

    rollout: int  # T: the rollout's UNet forwards (no grad)
    pathwise: float  # steps recomputed with an input gradient: F and H (sqdf: the base model's step)
    likelihood_ratio: float  # steps recomputed with a parameter gradient only: C (ddpo: every stochastic step;
    # grpo: its trained steps)
    forwards: float  # UNet forwards without grad beyond the rollout's (sqdf: the two means and x0_hat; grpo: the
    # reference's means)
    reward_images: float  # images the reward scores: R(x0), the value baseline's proxies, records
    reward_backward_images: float  # images whose dR/dx0 is taken

    @property
    def recomputed(self) -> float:
        """Steps recomputed with grad: each a UNet forward and a backward."""
        return self.pathwise + self.likelihood_ratio


def step_sets(options: EstimatorOptions, num_steps: int, deterministic: int = 0) -> tuple[int, int, int]:
    """(|F|, |H|, |C| used) of rlr or zo at T = num_steps; `deterministic`: steps t = 1..d have sigma = 0
    (zo runs them pathwise). |C| counts the steps a subsample keeps (zo_steps)."""
    T = num_steps
    if options.method == "rlr":
        f, h = options.first_order_steps, options.h
    elif options.method == "zo":
        f, h = deterministic, 0
    else:
        raise ValueError(f"step_sets is defined for rlr and zo, got method={options.method!r}")
    rest = max(T - f - h, 0)
    return f, h, rest if options.zo_steps is None else min(options.zo_steps, rest)


def _value_proxies(options: EstimatorOptions, likelihood_ratio_steps: int) -> int:
    """Images the value baseline scores per sample: one x0_hat per likelihood-ratio step, none with the
    surrogate proxy (its regression is fitted on pairs already scored)."""
    if options.baseline != "value" or options.value_proxy == "surrogate":
        return 0
    return likelihood_ratio_steps


def work(options: EstimatorOptions, num_steps: int, *, deterministic: int = 0, scored: bool = True) -> Work:
    """The work of one estimate of `options` at T = num_steps from a fresh rollout, per sample.

    deterministic  steps t = 1..d have sigma = 0 (an eta = 0 tail): zo, ddpo and grpo skip their likelihood ratio
    scored         whether the estimate scores R(x0) itself (False: ddpo given advantages, sqdf replayed)
    """
    options = EstimatorOptions.of(options)
    T, method, r0 = num_steps, options.method, int(scored)
    if method in ("rlr", "zo"):
        f, h, c = step_sets(options, T, deterministic)
        closing = 1 if method == "rlr" else 0  # H's first step carries a likelihood ratio
        return Work(T, f + h, c, 0, r0 + _value_proxies(options, c + closing), int(f > 0))
    if method == "full_bp":
        return Work(T, T, 0, 0, r0, 1)
    if method == "truncated_bp":
        k = options.truncated_bp_k
        return Work(T, (T + 1) / 2 if k == "random" else k, 0, 0, r0, 1)
    if method == "ddpo":
        return Work(T, 0, T - deterministic, 0, r0, 0)
    if method == "grpo":  # its trained steps, each also recomputed by the reference, without grad, when grpo_beta > 0
        trained = trained_count(options.grpo_step_fraction, T - deterministic)
        return Work(T, 0, trained, trained if options.grpo_beta else 0, r0, 0)
    if method == "sqdf":
        inner = _sqdf_inner_share(options, T, deterministic)
        # the policy's step (parameter gradient), the base model's next step with an input gradient unless the
        # drawn step is the last, forwards of both means and of x0_hat; the soft Q scored with its gradient and,
        # on a fresh chain, R(x0) for the record
        return Work(T, inner, 1, 2 + inner, 1 + r0, 1)
    raise ValueError(f"no cost model for method={method!r}")


def _sqdf_inner_share(options: EstimatorOptions, T: int, deterministic: int) -> float:
    """The share of sqdf's drawable steps (sampling order k) that are not the chain's last."""
    first, stop = options.sqdf_steps or (0, T)
    drawable = [k for k in range(first, min(stop, T)) if k < T - deterministic]
    return sum(k < T - 1 for k in drawable) / len(drawable) if drawable else 0.0


@dataclass(frozen=True)
class CostModel:
    """Work priced in UNet forward-equivalents (docs/estimator.md §7).

    step: a recomputed step, forward + backward (2.15 for SD1.4 with LoRA, counted with
    torch.utils.flop_counter); checkpoint: the extra forward per step of checkpoint_unet;
    reward: one image scored (VAE decode + reward network) against one UNet forward;
    reward_backward: dR/dx0 of one image, as a multiple of `reward` (the decode again under
    checkpoint_vae and the input gradient through it).
    """

    step: float = 2.15
    checkpoint: float = 1.0
    reward: float = 1.0
    reward_backward: float = 2.0

    def __post_init__(self):
        for name in ("step", "checkpoint", "reward", "reward_backward"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{type(self).__name__}.{name} must be a finite number >= 0, got {value!r}")

    def unet(self, w: Work, checkpoint_unet: bool = False) -> float:
        """UNet forward-equivalents per sample: the rollout, the recomputed steps, the extra forwards."""
        step = self.step + (self.checkpoint if checkpoint_unet else 0.0)
        return w.rollout + step * w.recomputed + w.forwards

    def rewards(self, w: Work) -> float:
        """The reward's forward-equivalents per sample: images scored and their backwards."""
        return self.reward * (w.reward_images + self.reward_backward * w.reward_backward_images)

    def forward_equivalents(self, w: Work, checkpoint_unet: bool = False) -> float:
        return self.unet(w, checkpoint_unet) + self.rewards(w)
