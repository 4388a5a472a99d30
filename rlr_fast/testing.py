"""What the tests and the benchmarks share: a chain with an exact gradient, small models, a naive baseline.

It lives in the package, not in tests/, so that `tests/` and `bench/` import it the same way
(`from rlr_fast.testing import ...`) and neither edits sys.path to reach the other.

The linear-Gaussian toy: with eps_theta(x, t) = (w + u s_t) * x + (b + v s_t), s_t = sqrt(1 - alphabar_t)
(elementwise), every DDIM step is x_{t-1} = A_t x_t + B_t + sigma_t n_t, so x_0 is Gaussian with a mean
and a diagonal variance that follow exactly from the schedule. For R(x_0) = -|x_0 - target|^2,
E[R] = -sum((m_0 - target)^2 + v_0), and autograd through that recursion is the exact gradient every
estimator must match in expectation.
"""

from __future__ import annotations

import contextlib
from typing import Union

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .ddim import step_coefficients
from .rollout import Trajectory, recompute_steps
from .sweep import SavedTensorMemory, resident_tensors

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

    def forward(self, sample, timestep, encoder_hidden_states=None):
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        s = self.noise_scale[t].to(sample.dtype).reshape((-1,) + (1,) * self.w.dim())
        return (self.w + self.u * s) * sample + (self.b + self.v * s)


def quadratic_reward(target: torch.Tensor):
    """R(x_0) = -|x_0 - target|^2 per sample (differentiable); `target` has one sample's shape."""
    return lambda x0: -(x0 - target).pow(2).flatten(1).sum(1)


def expected_reward(model: LinearEps, scheduler, num_steps: int, eta: float, target: torch.Tensor):
    """E[R(x_0)] in closed form, differentiable in the model's parameters."""
    scheduler.set_timesteps(num_steps)
    coef = step_coefficients(scheduler, eta)
    m = torch.zeros_like(model.w)
    var = torch.ones_like(model.w)  # x_T ~ N(0, I)
    for k in range(num_steps):
        s = model.noise_scale[coef.timesteps[k]]
        a = coef.c_x[k] + coef.c_e[k] * (model.w + model.u * s)
        m = a * m + coef.c_e[k] * (model.b + model.v * s)
        var = a * a * var + coef.sigmas[k] ** 2
    return -((m - target) ** 2 + var).sum()


def exact_loss_gradient(model: LinearEps, scheduler, num_steps: int, eta: float,
                        target: torch.Tensor) -> torch.Tensor:
    """grad of -E[R] over the parameters, flattened in `model.parameters()` order."""
    params = list(model.parameters())
    grads = torch.autograd.grad(-expected_reward(model, scheduler, num_steps, eta, target), params)
    return torch.cat([g.flatten() for g in grads])


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
