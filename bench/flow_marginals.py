"""How far the discrete flow SDE's marginals are from the flow's, by noise level and number of steps.

    python bench/flow_marginals.py

Exact, no sampling: under the exact velocity of Gaussian data (rlr_fast.testing.GaussianDataVelocity,
mean (0.8, -0.5, 0), std (0.5, 0.8, 1.2)) every step of the FlowSampler's chain is x_next = A x + B + s n,
so x_t's mean and variance follow by recursion and compare with the flow's marginal N((1 - t) mean, V_t).
For SD3.5's scheduler config (shift 3), T in (10, 40, 100, 400) and a in (0, 0.7, 1): the largest
relative variance error over the elements, over the first half of the chain, over its second half and
at x_0 (means agree to rounding throughout). Results: bench/results/flow_marginals.md and .csv.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import current_device, write_results  # noqa: E402
from rlr_fast.samplers import FlowSampler  # noqa: E402
from rlr_fast.testing import GaussianDataVelocity  # noqa: E402

STEPS, NOISE_LEVELS = (10, 40, 100, 400), (0.0, 0.7, 1.0)


def variance_errors(model: GaussianDataVelocity, num_steps: int, noise_level: float) -> list[float]:
    """Per step k = 1 .. T: max over elements of |Var x_k / V_{t_k} - 1| of the exact discrete chain."""
    sampler = FlowSampler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    schedule = sampler.schedule(num_steps, noise_level)
    sigmas = sampler.scheduler.sigmas.double()
    mean, var = torch.zeros_like(model.mean), torch.ones_like(model.var)  # x_T ~ N(0, I)
    errors = []
    for k in range(num_steps):
        gain, shift = model.affine(sigmas[k])
        a = schedule.c_x[k] + schedule.c_e[k] * gain
        mean, var = a * mean + schedule.c_e[k] * shift, a * a * var + schedule.sigmas[k] ** 2
        errors.append(float((var / model.marginal(sigmas[k + 1])[1] - 1).abs().max()))
    return errors


def main() -> None:
    model = GaussianDataVelocity(torch.tensor([0.8, -0.5, 0.0], dtype=torch.float64),
                                 torch.tensor([0.5, 0.8, 1.2], dtype=torch.float64))
    rows = []
    for steps in STEPS:
        for a in NOISE_LEVELS:
            errors = variance_errors(model, steps, a)
            rows.append(dict(steps=steps, noise_level=a, first_half_max=max(errors[:steps // 2]),
                             second_half_max=max(errors[steps // 2:]), x0=errors[-1]))
            print(rows[-1])
    header = (f"# Flow SDE: relative variance error of x_t against the flow's marginal\n\n"
              f"Exact recursion (no sampling), float64, {current_device(force_cpu=True).name}, "
              f"{datetime.date.today()}. Toy: exact velocity of N((0.8, -0.5, 0), diag(0.5, 0.8, 1.2)^2) data; "
              "SD3.5's scheduler (shift 3). a = 0 is the Euler ODE. See docs/estimator.md §14.")
    write_results("flow_marginals", rows, header)


if __name__ == "__main__":
    main()
