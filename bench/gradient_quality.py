"""Bias, variance, cost and memory of every gradient estimator (issues 4 and 12).

    python bench/gradient_quality.py            # the full run (about 30 minutes on one contended thread)
    python bench/gradient_quality.py --quick    # tiny sizes, prints only (the smoke test's run)

Settings, each estimator given the same N rollouts (its N estimates stay i.i.d.):
  toy   rlr_fast.testing's linear-Gaussian chain, whose exact gradient is in closed form, under SD1.4's
        schedule and under its coarse TOY_SCHEDULE (the unbiasedness tests' schedule), every estimator;
        and under SD1.4's schedule with trailing spacing at T = 6 and 20, zo and rlr under each baseline
        (the value baseline's comparison, docs/estimator.md §10);
  unet  rlr_fast.testing's tiny UNet2DConditionModel with random LoRA weights and a differentiable latent
        reward; its "exact" gradient is the mean of full_bp over ref_factor * N independent rollouts,
        and bias z combines the standard errors of both means.
Per estimator (docs/estimator.md, checking an estimator): max |z| over coordinates,
z = (mean - exact) / se; trace of the covariance of one estimate (a batch of B); cosine of the mean
estimate and mean cosine of one estimate to the exact gradient; model calls, recomputed steps and
reward calls of one estimate; its cost in UNet forward-equivalents and variance x cost, with reward
calls free (as on these models) and priced as SD1.4 prices them; peak bytes saved for backward;
median seconds of one estimate.

Results: bench/results/gradient_quality.md and .csv.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common, a source tree

from bench.common import current_device, median, time_it, write_results, zero_grads  # noqa: E402

import rlr_fast  # noqa: E402
from rlr_fast.baselines import ValueStatistics  # noqa: E402
from rlr_fast.costs import CostModel, Work  # noqa: E402
from rlr_fast.lora import lora_parameters  # noqa: E402
from rlr_fast.lora import add_lora
from rlr_fast.options import EstimatorOptions  # noqa: E402
from rlr_fast.testing import (TOY_SCHEDULE, LinearEps, exact_loss_gradient, make_scheduler, make_unet,  # noqa: E402
                              naive_backprop, quadratic_reward)

ETA = 1.0
# (label, method, options). rlr keeps first_order_steps=1 and j uniform (the defaults). Likelihood-ratio
# steps run one step (B samples) per model call by default, so that one step's activations are resident
# as in the pathwise sweeps; "all C in one call" shows the other end of that trade.
ALL_IN_ONE_CALL = 10**6  # max_batch above any T * B here
ESTIMATORS = [
    ("rlr h=1 loo", "rlr", dict(h=1, baseline="loo")),
    ("rlr h=2", "rlr", dict(h=2)),
    ("rlr h=2 loo", "rlr", dict(h=2, baseline="loo")),
    ("rlr h=2 value (loo fit)", "rlr", dict(h=2, baseline="value", value_fit="loo")),
    ("rlr h=2 value (running fit)", "rlr", dict(h=2, baseline="value", value_fit="running")),
    ("rlr h=4 loo", "rlr", dict(h=4, baseline="loo")),
    ("rlr h=2 loo zo_steps=2", "rlr", dict(h=2, baseline="loo", zo_steps=2)),
    ("rlr h=2 loo, all C in one call", "rlr", dict(h=2, baseline="loo", max_batch=ALL_IN_ONE_CALL)),
    ("zo", "zo", {}),
    ("zo loo", "zo", dict(baseline="loo")),
    ("zo value (loo fit)", "zo", dict(baseline="value", value_fit="loo")),
    ("zo value (running fit)", "zo", dict(baseline="value", value_fit="running")),
    ("full_bp", "full_bp", {}),
    ("truncated_bp k=1", "truncated_bp", dict(truncated_bp_k=1)),
    ("truncated_bp k=random", "truncated_bp", dict(truncated_bp_k="random")),
    ("ddpo", "ddpo", {}),
    ("sqdf alpha=0 gamma=1", "sqdf", {}),
]
# zo and rlr under each baseline: the value baseline's comparison (docs/estimator.md §10)
BY_BASELINE = [e for e in ESTIMATORS if e[0] in (
    "rlr h=2", "rlr h=2 loo", "rlr h=2 value (loo fit)", "rlr h=2 value (running fit)",
    "zo", "zo loo", "zo value (loo fit)", "zo value (running fit)")]
# DDPO's update is the gradient of a surrogate with standardised advantages averaged over steps, and
# SQDF's that of a one-step soft-Q objective at a drawn step (docs/estimator.md §11): other objectives
# and scales than grad -E[R], so only their direction is comparable.
DIRECTION_ONLY = {"ddpo", "sqdf"}
MEMORY_RUNS = 3  # estimates per estimator run with the saved-tensor hooks (they slow every op)

# Cost of one estimate in UNet forward-equivalents of the batch (docs/estimator.md §7), priced by
# rlr_fast.costs.CostModel: T for the rollout and CostModel.step per step recomputed with grad.
PRICES = CostModel(reward=0.0)  # reward calls free


def sd14_reward_call_cost() -> float:
    """A reward call on the batch in UNet forwards as SD1.4 at 512 px prices it: a VAE decode per sample
    against a UNet forward per sample, both counted with torch.utils.flop_counter
    (rlr_fast/assets/plan_measurements.json). The reward network itself is not counted."""
    from rlr_fast.plan.architectures import architecture_id, component_configs

    path = Path(rlr_fast.__file__).parent / "assets" / "plan_measurements.json"
    flops = json.loads(path.read_text())["flops"]
    ids = {name: architecture_id(name, config) for name, config in component_configs("sd14").items()}
    return flops[f"{ids['vae']}|64x64"] / flops[f"{ids['unet']}|64x64"]




@dataclass
class Setting:
    name: str
    model: torch.nn.Module
    rollout: Callable[[torch.Generator], rlr_fast.Trajectory]  # one batch of B chains
    reward: Callable[[torch.Tensor], torch.Tensor]
    exact: torch.Tensor  # flattened gradient of -E[R] over the trainable parameters
    exact_var: torch.Tensor  # variance of `exact` per coordinate (0 for a closed form)
    description: str
    estimators: list = field(default_factory=lambda: ESTIMATORS)
    reference: Optional[torch.nn.Module] = None  # sqdf's base model where `model` has no LoRA to switch off


def flat_grad(model) -> torch.Tensor:
    """The trainable parameters' .grad as one float64 vector (zeros where an estimator left none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                      for p in model.parameters() if p.requires_grad])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1)


def null_max_z(coords: int, level: float = 0.95) -> float:
    """The `level` quantile of max |z| over `coords` independent standard normal z (no bias)."""
    return statistics.NormalDist().inv_cdf(1 - (1 - level ** (1 / coords)) / 2)


# ------------------------------------------------------------------------------------------------
# Settings


def toy_setting(schedule: str, steps: int, batch: int, spacing: str = "leading", estimators=ESTIMATORS) -> Setting:
    sched = make_scheduler(**(TOY_SCHEDULE if schedule == "TOY_SCHEDULE" else {}), timestep_spacing=spacing)
    model = LinearEps(sched.alphas_cumprod, 3)
    target = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)  # the tests' TARGET
    exact = exact_loss_gradient(model, sched, steps, ETA, target).detach()

    def sample(g):
        x_T = torch.randn(batch, 3, generator=g, dtype=torch.float64)
        return rlr_fast.rollout(model, sched, x_T, num_steps=steps, eta=ETA, generator=g, store_x0_hat=True)

    name = f"toy {schedule}" + ("" if spacing == "leading" else f" {spacing} T={steps}")
    return Setting(name, model, sample, quadratic_reward(target), exact, torch.zeros_like(exact),
                   f"rlr_fast.testing.LinearEps (dim 3, 12 parameters, float64), R = -|x0 - target|^2, "
                   f"{schedule} schedule, {spacing} spacing, T = {steps}, eta = {ETA:g}, B = {batch}; exact gradient "
                   "in closed form (rlr_fast.testing.exact_loss_gradient)", estimators,
                   reference=copy.deepcopy(model).requires_grad_(False))


def unet_setting(steps: int, batch: int, n_ref: int, seed: int = 0) -> Setting:
    unet = make_unet(seed)
    add_lora(unet, rank=2, alpha=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    # peft zeroes lora_B; random small weights everywhere make every LoRA coordinate's gradient nonzero
    for p in lora_parameters(unet):
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    sched = make_scheduler()
    cond = torch.randn(1, 3, unet.config.cross_attention_dim, generator=g)
    target = 0.5 * torch.randn(4, unet.config.sample_size, unet.config.sample_size, generator=g)

    def reward(x0):
        return -(x0 - target).pow(2).flatten(1).mean(1)

    def sample(gen):
        x_T = torch.randn(batch, 4, unet.config.sample_size, unet.config.sample_size, generator=gen)
        return rlr_fast.rollout(unet, sched, x_T, num_steps=steps, eta=ETA, encoder_hidden_states=cond, generator=gen,
                                store_x0_hat=True)

    def full_bp(traj):
        zero_grads(unet)
        rlr_fast.estimate(unet, traj, reward, method="full_bp")
        return flat_grad(unet)

    ref_gen = torch.Generator().manual_seed(seed + 10_000)  # independent of every estimator's rollouts
    ref = torch.stack([full_bp(sample(ref_gen)) for _ in range(n_ref)])
    size = unet.config.sample_size
    return Setting("unet", unet, sample, reward, ref.mean(0), ref.var(0) / n_ref,
                   f"rlr_fast.testing.make_unet (UNet2DConditionModel, block_out_channels "
                   f"{tuple(unet.config.block_out_channels)}, {size}x{size}x4 latents, cross-attention on a fixed "
                   f"random {tuple(cond.shape)} context) + LoRA rank 2 on to_q/k/v/out.0 ({ref.shape[1]} trainable "
                   f"parameters, all set to N(0, 0.1^2)), float32; R = -mean((x0 - target)^2) over the latent, "
                   f"SD1.4 schedule, T = {steps}, eta = {ETA:g}, B = {batch}; 'exact' gradient = mean of full_bp "
                   f"over {n_ref} independent rollouts")


# ------------------------------------------------------------------------------------------------
# Measuring


def cost_columns(steps: int, unet_steps: float, reward_fwd: float, reward_bwd: float, trace_var) -> dict:
    """Cost of one estimate in UNet forward-equivalents, with reward calls free and priced as on SD1.4,
    and variance x cost for both."""
    done = Work(steps, unet_steps, 0, 0, reward_fwd, reward_bwd)
    cost = PRICES.forward_equivalents(done)
    cost_sd = dataclasses.replace(PRICES, reward=sd14_reward_call_cost()).forward_equivalents(done)
    times = (lambda c: None if trace_var is None else trace_var * c)
    return dict(cost_fwd_eq=cost, var_x_cost=times(cost), cost_sd14=cost_sd, var_x_cost_sd14=times(cost_sd))


def estimator_rows(setting: Setting, n: int, timing: dict, seed: int = 1) -> list[dict]:
    """One row per estimator (and one for naive_backprop) on N shared rollouts of `setting`."""
    device = current_device(force_cpu=True)
    model, reward = setting.model, setting.reward
    g = torch.Generator().manual_seed(seed)
    trajs = [setting.rollout(g) for _ in range(n)]
    steps = trajs[0].num_steps
    base = dict(setting=setting.name, T=steps, B=trajs[0].batch_size, N=n)
    rows = []
    for label, method, options in setting.estimators:
        index = [e[0] for e in ESTIMATORS].index(label)  # a setting's subset draws as the full list does
        draws = torch.Generator().manual_seed(100 + index)  # j, k and the zo subsample
        # the running value fit carries over the N estimates, as over a run's updates
        value_state = ValueStatistics() if EstimatorOptions(method=method, **options).needs_value_state else None
        if method == "sqdf":
            options = dict(options, reference=setting.reference)
        est = torch.empty(n, setting.exact.numel(), dtype=torch.float64)
        totals = dict.fromkeys(("unet_forward", "unet_backward", "unet_steps", "reward_forward", "reward_backward",
                                "value_fallbacks"), 0)
        peak = 0
        for i, traj in enumerate(trajs):
            zero_grads(model)
            track = i < MEMORY_RUNS
            stats = rlr_fast.estimate(model, traj, reward, method=method, generator=draws, track_memory=track,
                                      value_state=value_state, **options)
            est[i] = flat_grad(model)
            for key in totals:
                totals[key] += stats.get(key, 0)
            if track:
                peak = max(peak, stats["peak_saved_bytes"])

        def one():
            zero_grads(model)
            state = None if value_state is None else value_state.copy()
            rlr_fast.estimate(model, trajs[0], reward, method=method, generator=draws, value_state=state, **options)

        per = {k: v / n for k, v in totals.items()}
        q = quality(est, setting, direction_only=method in DIRECTION_ONLY)
        row = dict(base, estimator=label, **q, model_fwd=per["unet_forward"], model_bwd=per["unet_backward"],
                   unet_steps=per["unet_steps"], reward_fwd=per["reward_forward"], reward_bwd=per["reward_backward"],
                   value_fallbacks=per["value_fallbacks"] if options.get("baseline") == "value" else None,
                   **cost_columns(steps, per["unet_steps"], per["reward_forward"], per["reward_backward"],
                                  q["trace_var"]),
                   peak_saved_bytes=peak, sec_per_estimate=median(time_it(one, device, **timing)))
        rows.append(row)
        print(_line(row), flush=True)

    if setting.estimators is ESTIMATORS:
        stats = naive_backprop(model, trajs[0], reward, track_memory=True)
        row = dict(base, estimator="naive_backprop (one graph)", model_fwd=stats["unet_forward"],
                   model_bwd=stats["unet_backward"], unet_steps=steps, reward_fwd=1, reward_bwd=1,
                   **{k: v for k, v in cost_columns(steps, steps, 1, 1, None).items() if "var" not in k},
                   peak_saved_bytes=stats["peak_saved_bytes"],
                   sec_per_estimate=median(time_it(lambda: naive_backprop(model, trajs[0], reward), device, **timing)))
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def quality(est: torch.Tensor, setting: Setting, direction_only: bool) -> dict:
    mean = est.mean(0)
    out = dict(cos_mean_to_exact=float(cosine(mean, setting.exact)),
               mean_cos_single=float(cosine(est, setting.exact).mean()))
    if direction_only:
        return dict(bias_max_abs_z=None, trace_var=None, **out)
    var = est.var(0)
    se = (var / est.shape[0] + setting.exact_var).sqrt()
    z = (mean - setting.exact) / se
    return dict(bias_max_abs_z=float(z.abs().max()), trace_var=float(var.sum()), **out)


def _line(row: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def run(*, n: int, toy_steps: int, toy_batch: int, value_steps: tuple[int, ...], unet_n: int, unet_steps: int,
        unet_batch: int, ref_factor: int, timing: dict) -> tuple[list[dict], list[str]]:
    """All rows and one description line per setting."""
    rows, notes = [], []
    settings = [(lambda: toy_setting("SD1.4", toy_steps, toy_batch), n),
                (lambda: toy_setting("TOY_SCHEDULE", toy_steps, toy_batch), n)]
    settings += [(lambda t=t: toy_setting("SD1.4", t, toy_batch, "trailing", BY_BASELINE), n) for t in value_steps]
    settings += [(lambda: unet_setting(unet_steps, unet_batch, ref_factor * unet_n), unet_n)]
    for make, count in settings:
        start = time.perf_counter()
        setting = make()
        rows += estimator_rows(setting, count, timing)
        g = torch.Generator().manual_seed(0)
        rollout_s = median(time_it(lambda: setting.rollout(g), current_device(force_cpu=True), **timing))
        coords = setting.exact.numel()
        notes.append(f"- **{setting.name}**: {setting.description}. N = {count} estimates per estimator. "
                     f"{coords} coordinates: with no bias, max |z| < {null_max_z(coords):.2f} in 95% of runs if the "
                     "z were independent standard normal (approximate: the standard errors are estimated and "
                     f"likelihood-ratio estimates are heavy-tailed). One rollout (T forwards, no grad, x0_hat "
                     f"stored) takes {rollout_s:.3g} s (median). The setting took {time.perf_counter() - start:.0f} s.")
    return rows, notes


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="toy: estimates per estimator")
    parser.add_argument("--toy-steps", type=int, default=8, help="toy: T of the settings with every estimator")
    parser.add_argument("--toy-batch", type=int, default=8, help="toy: B")
    parser.add_argument("--value-steps", type=str, default="6,20",
                        help="toy: T of the trailing-spacing settings that compare baselines (comma-separated)")
    parser.add_argument("--unet-n", type=int, default=48, help="unet: estimates per estimator")
    parser.add_argument("--unet-steps", type=int, default=10, help="unet: T")
    parser.add_argument("--unet-batch", type=int, default=8, help="unet: B")
    parser.add_argument("--ref-factor", type=int, default=2, help="unet: reference full_bp samples per N")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, print only: the committed results are left alone (smoke test)")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/gradient_quality.py", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(1)  # the cores are shared; one thread per run keeps timings comparable
    sizes = dict(n=args.n, toy_steps=args.toy_steps, toy_batch=args.toy_batch,
                 value_steps=tuple(int(t) for t in args.value_steps.split(",") if t.strip()), unet_n=args.unet_n,
                 unet_steps=args.unet_steps, unet_batch=args.unet_batch, ref_factor=args.ref_factor,
                 timing=dict(warmup=1, repeats=5))
    if args.quick:
        sizes.update(n=40, toy_steps=5, value_steps=(6,), unet_n=2, unet_steps=5, unet_batch=5, ref_factor=1,
                     timing=dict(warmup=0, repeats=1))
    start = time.perf_counter()
    rows, notes = run(**sizes)
    device = current_device(force_cpu=True)
    header = [
        "# Gradient quality of the estimators", "", f"Command: `{command}`", "",
        f"Device: {device.name}; torch {torch.__version__}; CPU only (no GPU in this session); "
        f"{time.strftime('%Y-%m-%d')}. Total wall clock {time.perf_counter() - start:.0f} s.", "",
        *notes, "",
        "Every estimator of a setting sees the same N rollouts (eta = 1, DDIM), so its N estimates are i.i.d.; "
        "rlr uses first_order_steps = 1 and j uniform. Columns:",
        "- bias_max_abs_z: max over coordinates of |mean - exact| / se, se the standard error of the mean "
        "(combined with the reference's in the unet setting).",
        "- trace_var: trace of the covariance of one estimate (one batch of B); cos_mean_to_exact: cosine of the "
        "mean of the N estimates to the exact gradient; mean_cos_single: mean cosine of one estimate to it. In the "
        "unet setting the reference is itself noisy, which caps both cosines below 1.",
        "- model_fwd / model_bwd: model calls of one estimate (mean over the N; the rollout's T forwards come on "
        "top for every estimator); unet_steps: steps recomputed with grad (each a forward and a backward of the "
        "batch); reward_fwd / reward_bwd: reward calls on the batch (R(x0), and with the value baseline one per "
        "likelihood-ratio step on x0_hat) and reward backwards; value_fallbacks: step-sample baselines of one "
        "estimate that fell back to a mean reward (fewer than 4 pairs in the fit's pool, or no spread of q).",
        f"- cost_fwd_eq: UNet forward-equivalents of the batch, T (rollout) + {PRICES.step} x unet_steps "
        "(docs/estimator.md §7), reward calls free as they nearly are on these models; var_x_cost = trace_var x "
        f"cost_fwd_eq. cost_sd14 adds reward calls priced as on SD1.4 at 512 px without guidance: "
        f"{sd14_reward_call_cost():.2f} UNet forwards per reward call (a VAE decode against a UNet forward, FLOPs "
        f"from rlr_fast/assets/plan_measurements.json; the reward network not counted) and "
        f"{PRICES.reward_backward:g} calls' worth per reward backward; var_x_cost_sd14 = trace_var x cost_sd14. "
        "Compare variance x cost within a setting only.",
        f"- peak_saved_bytes: peak bytes saved for backward (parameters excluded), max over the first {MEMORY_RUNS} "
        "estimates; sec_per_estimate: median over repeated estimates on one stored trajectory, rollout excluded.",
        "- ddpo (on-policy, default standardised advantages) estimates a surrogate of another scale: cosines only.",
        "- naive_backprop: full backprop as one autograd graph over the chain; the same gradient as full_bp "
        "(tests/test_estimators.py checks it to 1e-10), so only its cost and memory are listed.",
    ]
    if not args.quick:
        csv_path, md_path = write_results("gradient_quality", rows, "\n".join(header))
        print(f"wrote {md_path} and {csv_path}")
    return rows


if __name__ == "__main__":
    main()
