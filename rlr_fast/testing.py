"""What the tests and the benchmarks share: a chain with an exact gradient, small models, a naive baseline.

It lives in the package, not in tests/, so that `tests/` and `bench/` import it the same way
(`from rlr_fast.testing import ...`) and neither edits sys.path to reach the other.

The linear-Gaussian toy: with eps_theta(x, t) = (w + u s_t) * x + (b + v s_t), s_t = sqrt(1 - alphabar_t)
(elementwise), every DDIM step is x_{t-1} = A_t x_t + B_t + sigma_t n_t, so x_0 is Gaussian with a mean
and a diagonal variance that follow exactly from the schedule. For R(x_0) = -|x_0 - target|^2,
E[R] = -sum((m_0 - target)^2 + v_0), and autograd through that recursion is the exact gradient every
estimator must match in expectation. `ConditionedLinearEps` adds (a c_t) x + d c_t, c_t the sample's
conditioning at the step, so that the gradient also tests which conditioning each step was recomputed with.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .baselines import ValueStatistics, reward_baseline
from .estimators import estimate
from .options import EstimatorOptions
from .rollout import Trajectory, recompute_steps, rollout
from .samplers import as_sampler
from .sweep import CallCounter, SavedTensorMemory, pathwise_sweep, resident_tensors

# A coarse schedule (80 training steps, linear betas up to 0.25): every step's sigma is a sizeable
# fraction of the signal, so likelihood-ratio terms have moderate variance and a few thousand samples
# resolve small biases. make_scheduler() without arguments is SD1.4's schedule.
TOY_SCHEDULE = dict(num_train_timesteps=80, beta_schedule="linear", beta_start=0.02, beta_end=0.25, steps_offset=0)


class LinearEps(torch.nn.Module):
    """eps_theta(x, t) = (w + u s_t) * x + (b + v s_t), s_t = sqrt(1 - alphabar_t), elementwise.

    `dim` is the shape of one sample (an int for a vector; (C, F, H, W) for a video-shaped toy);
    each of w, u, b, v has that shape.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, dim: Union[int, tuple[int, ...]] = 3, seed: int = 0,
                 scale: float = 0.1):
        super().__init__()
        self.register_buffer("noise_scale", (1 - alphas_cumprod.double()).sqrt())
        shape = (dim,) if isinstance(dim, int) else tuple(dim)
        g = torch.Generator().manual_seed(seed)
        init = lambda mean: torch.nn.Parameter(mean + scale * torch.randn(shape, generator=g, dtype=torch.float64))
        # Near the ideal denoiser of N(0, I) data, eps = sqrt(1 - alphabar_t) x: the chain then
        # keeps x_t about N(0, I), so gradients stay O(1) and variances comparable.
        self.w, self.u, self.b, self.v = init(0.0), init(1.0), init(0.0), init(0.0)

    def scale(self, timestep) -> torch.Tensor:
        """s_t of each timestep (float64, flattened)."""
        return self.noise_scale[torch.as_tensor(timestep, device=self.noise_scale.device).long().reshape(-1)]

    def forward(self, sample, timestep, encoder_hidden_states=None):
        s = self.scale(timestep).to(sample.device, sample.dtype).reshape((-1,) + (1,) * self.w.dim())
        return (self.w + self.u * s) * sample + (self.b + self.v * s)


class LinearVelocity(LinearEps):
    """The flow-matching toy: v_theta(x, t) = (w + u t) * x + (b + v t), t = timestep / 1000 the flow time
    (FlowSampler's timesteps are sigma * 1000). Initialised near v = (2t - 1) x, the exact velocity of N(0, I)
    data at t = 0, 1/2 and 1, so the chain keeps x_t about N(0, I). With a FlowSampler every step is
    x_next = A x + B + sigma n as for LinearEps, and `expected_reward` holds unchanged."""

    def __init__(self, dim: Union[int, tuple[int, ...]] = 3, seed: int = 0, scale: float = 0.1):
        super().__init__(torch.zeros(1), dim, seed, scale)  # LinearEps's noise_scale table is not read
        with torch.no_grad():
            self.w -= 1.0
            self.u += 1.0

    def scale(self, timestep) -> torch.Tensor:
        return torch.as_tensor(timestep, dtype=torch.float64, device=self.w.device).reshape(-1) / 1000


class GaussianDataVelocity(torch.nn.Module):
    """The exact velocity E[noise - x_0 | x_t] of data x_0 ~ N(mean, std^2) (elementwise) under
    x_t = (1 - t) x_0 + t noise, t = timestep / 1000: x_t is N((1 - t) mean, V_t), V_t = (1 - t)^2 std^2 + t^2,
    and v = gain_t x + shift_t, gain_t = (t - (1 - t) std^2) / V_t, shift_t = -gain_t (1 - t) mean - mean. The
    flow's marginals are known at every t, so a sampler's can be checked against them."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.var = mean, std**2

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of x_t."""
        return (1 - t) * self.mean, (1 - t) ** 2 * self.var + t**2

    def affine(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain_t, shift_t): v = gain_t x + shift_t."""
        mean, var = self.marginal(t)
        gain = (t - (1 - t) * self.var) / var
        return gain, -gain * mean - self.mean

    def forward(self, sample, timestep, encoder_hidden_states=None):
        gain, shift = self.affine(torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1) / 1000)
        return gain * sample + shift


class ConditionedLinearEps(LinearEps):
    """eps = (w + u s_t + a c) * x + (b + v s_t + d c), c = encoder_hidden_states[:, 0] (B, dim): each
    sample's conditioning at the step scales the step's input Jacobian and shifts its mean."""

    def __init__(self, alphas_cumprod: torch.Tensor, dim: int = 3, seed: int = 0, scale: float = 0.1):
        super().__init__(alphas_cumprod, dim, seed, scale)
        g = torch.Generator().manual_seed(seed + 1)
        init = lambda mean: torch.nn.Parameter(mean + scale * torch.randn(dim, generator=g, dtype=torch.float64))
        self.a, self.d = init(0.2), init(0.5)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        if encoder_hidden_states is None or encoder_hidden_states.shape[::2] != (len(sample), self.a.numel()):
            raise ValueError(f"ConditionedLinearEps needs encoder_hidden_states (batch, tokens, {self.a.numel()}), "
                             f"got {getattr(encoder_hidden_states, 'shape', None)}")
        c = encoder_hidden_states[:, 0].to(sample.dtype)
        return super().forward(sample, timestep) + self.a * c * sample + self.d * c


def quadratic_reward(target: torch.Tensor):
    """R(x_0) = -|x_0 - target|^2 per sample (differentiable); `target` has one sample's shape."""
    return lambda x0: -(x0 - target).pow(2).flatten(1).sum(1)


def expected_reward(model: LinearEps, sampler, num_steps: int, eta: float, target: torch.Tensor,
                    cond: Optional[torch.Tensor] = None):
    """E[R(x_0)] in closed form, differentiable in the model's parameters.

    `sampler`: a `rlr_fast.samplers.Sampler` or a DDIMScheduler whose timesteps the model's `scale` reads
    (a LinearEps's index its `noise_scale`; a LinearVelocity's are a FlowSampler's). `cond` (T, B, dim): for
    a `ConditionedLinearEps`, what step k of sample b is conditioned on; the result is then the batch mean
    of E[R(x_0^b)].
    """
    coef = as_sampler(sampler).schedule(num_steps, eta)
    m = torch.zeros_like(model.w)
    var = torch.ones_like(model.w)  # x_T ~ N(0, I)
    for k in range(num_steps):
        s = model.scale(coef.timesteps[k])
        gain, shift = model.w + model.u * s, model.b + model.v * s
        if cond is not None:
            gain, shift = gain + model.a * cond[k], shift + model.d * cond[k]
        a = coef.c_x[k] + coef.c_e[k] * gain
        m = a * m + coef.c_e[k] * shift
        var = a * a * var + coef.sigmas[k] ** 2
    err = (m - target) ** 2 + var  # one sample's shape, with a leading batch dimension under `cond`
    return -err.flatten(err.dim() - model.w.dim()).sum(-1).mean()


def exact_loss_gradient(model: LinearEps, sampler, num_steps: int, eta: float,
                        target: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad of -E[R] (`sampler`, `cond` as for `expected_reward`) over the parameters, flattened in
    `model.parameters()` order."""
    params = list(model.parameters())
    grads = torch.autograd.grad(-expected_reward(model, sampler, num_steps, eta, target, cond), params)
    return torch.cat([g.flatten() for g in grads])


def toy_estimates(model: LinearEps, sampler, method: str, *, n: int, steps: int, eta: float, batch: int,
                  target: torch.Tensor, seed: int = 0, **opts) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent estimates (n, parameters) of `method` on the toy chain of `sampler`, and the exact
    gradient of its loss (the unbiasedness tests' z-test compares them). With baseline="value" the rollouts
    store x0_hat, and a running fit or surrogate proxy carries one ValueStatistics over the n estimates,
    as in training."""
    exact = exact_loss_gradient(model, sampler, steps, eta, target)
    g = torch.Generator().manual_seed(seed)
    value = opts.get("baseline") == "value"
    if value and (opts.get("value_fit", "running") == "running" or opts.get("value_proxy") == "surrogate"):
        opts["value_state"] = ValueStatistics()
    out = torch.empty(n, exact.numel(), dtype=torch.float64)
    for i in range(n):
        x_t = torch.randn(batch, *model.w.shape, generator=g, dtype=torch.float64)
        traj = rollout(model, sampler, x_t, num_steps=steps, eta=eta, generator=g, store_x0_hat=value)
        model.zero_grad(set_to_none=True)
        estimate(model, traj, quadratic_reward(target), method=method, generator=g, **opts)
        out[i] = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out, exact


def max_z(est: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest |z| over parameters of the estimates' mean against the exact gradient."""
    se = est.std(0) / math.sqrt(est.shape[0])
    return float(((est.mean(0) - exact) / se).abs().max())


def make_unet(seed: int = 0, cross_attention_dim: int = 16, sample_size: int = 8) -> UNet2DConditionModel:
    """A small UNet2DConditionModel: the SD1.4 block types at toy width, frozen (add LoRA to train it)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=4, norm_num_groups=8,
        )
    return unet.eval().requires_grad_(False)


def make_lora_unet(dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """`make_unet` in `dtype` with rank-2 LoRA whose weights are all random (peft zeroes lora_B, which
    would leave half the LoRA parameters without a gradient)."""
    from .lora import add_lora, lora_parameters

    unet = make_unet().to(dtype)
    add_lora(unet, rank=2, alpha=2)
    g = torch.Generator().manual_seed(3)
    for p in lora_parameters(unet):
        p.data = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return unet


def make_scheduler(**overrides) -> DDIMScheduler:
    """SD1.4's noise schedule as a DDIMScheduler (keyword arguments override its config)."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


def naive_backprop(model, traj: Trajectory, reward_fn, *, track_memory: bool = False) -> dict:
    """Full backprop as one autograd graph over the whole chain: the baseline the sweeps are compared with.

    Re-runs the T steps from x_T with the stored noises and grad enabled, then back-propagates
    once, so every step's activations are alive together (memory grows linearly in T). Same
    gradient as `estimate(method="full_bp")`, which holds one step at a time.
    """
    memory = SavedTensorMemory(exclude=resident_tensors(model, traj))
    with memory.track() if track_memory else contextlib.nullcontext():
        x = traj.latents[0]
        for k in range(traj.num_steps):
            mean = recompute_steps(model, traj, [k], x.unsqueeze(0))[0]
            x = mean + traj.sigmas[k].to(mean.dtype) * traj.noises[k]
        r = reward_fn(x)
        (-r.mean()).backward()
    return {"reward_mean": float(r.detach().mean()), "unet_forward": traj.num_steps,
            "unet_backward": traj.num_steps, "peak_saved_bytes": memory.peak if track_memory else None}


# ----------------------------------------------------------------------------------------------
# Every estimator design on the toy, measured (tests/test_design.py, bench/design_quality.py)


class GroupedLinearEps(torch.nn.Module):
    """`groups` copies of a LinearEps's parameters: sample i of a batch of groups * batch samples uses copy
    (i mod groups * batch) // batch, so one sweep over many independent batches leaves each batch's
    gradient in its own parameter row."""

    def __init__(self, base: LinearEps, groups: int, batch: int):
        super().__init__()
        self.register_buffer("noise_scale", base.noise_scale)
        self.groups, self.batch = groups, batch
        for name in ("w", "u", "b", "v"):
            setattr(self, name, torch.nn.Parameter(getattr(base, name).detach().expand(groups, -1).clone()))

    def forward(self, sample, timestep, encoder_hidden_states=None):
        s = self.noise_scale[torch.as_tensor(timestep).long().reshape(-1)].to(sample.dtype).reshape(-1, 1)
        g = (torch.arange(sample.shape[0]) % (self.groups * self.batch)) // self.batch
        return (self.w[g] + self.u[g] * s) * sample + (self.b[g] + self.v[g] * s)

    def take(self) -> torch.Tensor:
        """(groups, parameters) per-batch gradients in LinearEps's parameter order; clears .grad."""
        params = (self.w, self.u, self.b, self.v)
        out = torch.cat([torch.zeros_like(p) if p.grad is None else p.grad for p in params], 1)
        self.zero_grad(set_to_none=True)
        return out


@dataclass
class MeasuredDesign:
    """One design measured on M batches: per batch, |g - g*|^2 of its estimate given the chain (all of C)
    plus its subsampling variance given the chain; their mean is the design's trace variance."""

    values: torch.Tensor  # (M,)
    cost: float  # UNet forward-equivalents per update (rlr_fast.costs.CostModel)

    @property
    def efficiency(self) -> float:
        return float(self.values.mean()) * self.cost

    def ratio(self, other: "MeasuredDesign") -> tuple[float, float]:
        """efficiency / other's efficiency, and its standard error (delta method, paired by batch)."""
        ratio = self.efficiency / other.efficiency
        influence = self.values / self.values.mean() - other.values / other.values.mean()
        return ratio, ratio * float(influence.std() / len(influence) ** 0.5)


@dataclass
class DesignShares:
    """The pieces every design on the toy is assembled from (docs/estimator.md §4-§5), per batch of M: the
    pathwise sweep's per-step shares and, per baseline, those of each half-order sweep."""

    exact: torch.Tensor  # (parameters,): the closed-form gradient g*
    sigmas: list  # [t - 1]: step t's sigma
    pathwise: torch.Tensor  # (T, M, parameters) [t - 1]: step t's pathwise share
    # baseline -> (T, T, M, parameters) [j, i]: step j+1+i's share of the sweep closed at j+1 ([t - 1, 0]: L_t)
    half: dict

    def measured(self, F, H: list, C: list, b, pathwise_steps: int, reward_grad: bool, costs) -> dict:
        """{zo_steps: MeasuredDesign} of F pathwise + the H shares + C's likelihood ratios, k of |C| = m."""
        from .costs import Work

        T, exact = len(self.sigmas), self.exact
        ratios = [self.half[b][t - 1, 0] for t in C] if C else []
        error = (sum([self.pathwise[t - 1] for t in F] + H + ratios, torch.zeros_like(exact)) - exact).pow(2).sum(-1)
        m = len(C)
        spread = torch.stack(ratios).var(0).sum(-1) if m >= 2 else torch.zeros_like(error)
        def cost(k: int) -> float:
            return costs.forward_equivalents(Work(T, pathwise_steps, k, 0, 1, int(reward_grad)))

        return {(k if k < m else None): MeasuredDesign(error + (m * m / k - m) * spread, cost(k))
                for k in range(1, m + 1)} if m else {None: MeasuredDesign(error, cost(0))}


def design_shares(model: LinearEps, scheduler, *, num_steps: int, batches: int, batch_size: int, baselines: tuple,
                  target: torch.Tensor, seed: int, eta: float = 1.0) -> DesignShares:
    """The toy's DesignShares for R = quadratic_reward(target) on `batches` independent batches of one
    rollout, each share from sweep.pathwise_sweep run on all batches at once (GroupedLinearEps)."""
    T, M, B = num_steps, batches, batch_size
    grouped = GroupedLinearEps(model, M, B)
    g = torch.Generator().manual_seed(seed)
    traj = rollout(grouped, scheduler, torch.randn(M * B, model.w.numel(), generator=g, dtype=torch.float64),
                   num_steps=T, eta=eta, generator=g)
    exact = exact_loss_gradient(model, scheduler, T, eta, target).detach()
    x0 = traj.x0.detach().requires_grad_()
    rewards = quadratic_reward(target)(x0)
    (dr,) = torch.autograd.grad(rewards.sum(), x0)
    rewards = rewards.detach()
    options, calls = EstimatorOptions(), CallCounter()
    sigma = [float(traj.sigmas[traj.step_index(t)]) for t in range(1, T + 1)]
    pathwise = torch.zeros(T, M, exact.numel(), dtype=torch.float64)
    pathwise_sweep(grouped, traj, traj.step_index(1), traj.step_index(T), -dr / B, options, calls,
                   after_step=lambda k: pathwise.__setitem__(traj.math_step(k) - 1, grouped.take()))
    half = {}
    for b in baselines:
        base = torch.cat([reward_baseline(r, EstimatorOptions(baseline=b)) for r in rewards.reshape(M, B)])
        weight = -(rewards - base) / B
        shares = half[b] = torch.zeros(T, T, M, exact.numel(), dtype=torch.float64)
        for j in (j for j in range(T) if sigma[j] > 0):
            k = traj.step_index(j + 1)
            pathwise_sweep(grouped, traj, k, 0, traj.noises[k] * (weight / sigma[j])[:, None], options, calls,
                           after_step=lambda i, j=j, s=shares: s.__setitem__((j, traj.math_step(i) - j - 1),
                                                                              grouped.take()))
    return DesignShares(exact, sigma, pathwise, half)


def measure_design_grid(model: LinearEps, scheduler, *, num_steps: int, batches: int, batch_size: int,
                        baselines: tuple, target: torch.Tensor, seed: int, eta: float = 1.0,
                        costs=None) -> dict:
    """Every unbiased estimator design on the toy, measured on `batches` independent batches against the
    closed-form gradient g*: {(method, f, h, j, zo_steps, baseline): MeasuredDesign}, keyed as
    rlr_fast.design.Candidate.key (zo_steps None: all of C; j "uniform" is the mean over the valid j).

    The designs are written out from docs/estimator.md §4-§5 (not from rlr_fast.design), each assembled
    from the DesignShares of `design_shares`.
    """
    from .costs import CostModel

    costs = CostModel() if costs is None else costs
    T, shares = num_steps, design_shares(model, scheduler, num_steps=num_steps, batches=batches,
                                         batch_size=batch_size, baselines=baselines, target=target, seed=seed, eta=eta)
    sigma, half = shares.sigmas, shares.half

    def measured(F, H: list, C: list, b, pathwise_steps: int, reward_grad: bool) -> dict:
        return shares.measured(F, H, C, b, pathwise_steps, reward_grad, costs)

    deterministic = [t for t in range(1, T + 1) if sigma[t - 1] == 0]
    f0 = max(deterministic, default=0)
    grid = {("full_bp", T, 0, None, None, None): measured(range(1, T + 1), [], [], None, T, True)[None]}
    for b in baselines:
        for k, v in measured(range(1, f0 + 1), [], list(range(f0 + 1, T + 1)), b, f0, f0 > 0).items():
            grid[("zo", f0, 0, None, k, b)] = v
        for f, h in ((f, h) for f in range(T) for h in range(1, T - f + 1)):
            js = [j for j in range(f, T - h + 1)
                  if sigma[j] > 0 and all(t <= f or j + 1 <= t <= j + h for t in deterministic)]
            by_j = {j: measured(range(1, f + 1), [half[b][j, i] for i in range(h)],
                                [t for t in range(f + 1, T + 1) if not j + 1 <= t <= j + h], b, f + h, f > 0)
                    for j in js}
            for j, designs in by_j.items():
                grid.update({("rlr", f, h, j, k, b): v for k, v in designs.items()})
            for k in (by_j[js[0]] if js else {}):  # j uniform: each batch's mean over the valid j
                grid[("rlr", f, h, "uniform", k, b)] = MeasuredDesign(
                    torch.stack([by_j[j][k].values for j in js]).mean(0), by_j[js[0]][k].cost)
    return grid
