"""A linear-Gaussian chain whose expected reward has a closed-form gradient.

With eps_theta(x, t) = (w + u s_t) * x + (b + v s_t), s_t = sqrt(1 - alphabar_t) (elementwise), every DDIM step
is x_{t-1} = A_t x_t + B_t + sigma_t n_t, so x_0 is Gaussian with a mean and a diagonal
variance that follow exactly from the schedule. For R(x_0) = -|x_0 - target|^2,
E[R] = -sum((m_0 - target)^2 + v_0), and autograd through that recursion is the exact gradient
every estimator must match in expectation (rlr_math.md section 6).
"""

from __future__ import annotations

import torch

from .ddim import step_coefficients


class LinearEps(torch.nn.Module):
    """eps_theta(x, t) = (w + u s_t) * x + (b + v s_t), s_t = sqrt(1 - alphabar_t); parameters of size `dim`."""

    def __init__(self, alphas_cumprod: torch.Tensor, dim: int = 3, seed: int = 0, scale: float = 0.1):
        super().__init__()
        self.register_buffer("noise_scale", (1 - alphas_cumprod.double()).sqrt())
        g = torch.Generator().manual_seed(seed)
        init = lambda mean: torch.nn.Parameter(mean + scale * torch.randn(dim, generator=g, dtype=torch.float64))
        # Near the ideal denoiser of N(0, I) data, eps = sqrt(1 - alphabar_t) x: the chain then
        # keeps x_t about N(0, I), so gradients stay O(1) and variances comparable.
        self.w, self.u, self.b, self.v = init(0.0), init(1.0), init(0.0), init(0.0)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        s = self.noise_scale[t].to(sample.dtype).reshape(-1, 1)
        return (self.w + self.u * s) * sample + (self.b + self.v * s)


def quadratic_reward(target: torch.Tensor):
    """R(x_0) = -|x_0 - target|^2 per sample (differentiable)."""
    return lambda x0: -(x0 - target).pow(2).sum(1)


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
