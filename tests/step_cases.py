"""Inputs, tolerances and the comparison every backend of the fused DDIM step is tested with.

The expected values are the reference (kernels/reference.py) evaluated in float64 on the upcast
inputs; the backends compute in fp32 (fp64 for fp64 inputs) and round once to the inputs' dtype,
so TOLERANCES allows one such rounding. Log-densities come back in fp32 (fp64 for fp64) for
every input dtype, so they are held to the fp32 (fp64) tolerance.
"""

import torch

from rlr_fast.ddim import ddim_step_reference, log_density_dtype

# dtype -> (atol, rtol) of an output against the float64 reference rounded once to dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 8e-3),
    torch.float64: (1e-12, 1e-12),
}
ALL_DTYPES = list(TOLERANCES)


def step_inputs(shape, dtype, device, cfg, seed=0):
    """(sample, model_output, model_output_cond or None, noise, c_x, c_e, sigma); sigma[0] == 0."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x, u, c, noise = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    c_x = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    c_e = torch.randn(b, generator=g, dtype=torch.float64)
    # sigma in [0.5, 1.5): |log_prob| of a 4x64x64 sample stays inside the fp16 range (~23000);
    # sample 0 is deterministic (sigma == 0: no noise, log_prob 0, no log_prob gradient)
    sigma = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    sigma[0] = 0.0
    return x, u, (c if cfg else None), noise, c_x, c_e, sigma


def cotangents(shape, dtype, device, seed=1):
    """Random cotangents of (prev, mean, log_prob)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype),
            torch.randn(shape[0], generator=g).to(device, dtype))


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def run_step(fn, inputs, cots, w, dtype=None):
    """Outputs and input gradients (sample, model_output, model_output_cond, noise) of one step."""
    x, u, c, noise, c_x, c_e, sigma = inputs
    x, u, c, noise = leaves((x, u, c, noise), dtype)
    outs = fn(x, u, noise, c_x, c_e, sigma, model_output_cond=c, guidance_scale=w)
    torch.autograd.backward(outs, [t.to(o.dtype) for t, o in zip(cots, outs)])
    return outs, [None if t is None else t.grad for t in (x, u, c, noise)]


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def check_step(fn, shape, dtype, device, cfg, inputs=None):
    """fn's outputs and gradients against the float64 reference, log_prob in its own dtype."""
    inputs = inputs or step_inputs(shape, dtype, device, cfg)
    cots = cotangents(shape, dtype, device)
    w = 7.5 if cfg else 1.0
    outs, grads = run_step(fn, inputs, cots, w)
    ref_outs, ref_grads = run_step(ddim_step_reference, inputs, cots, w, dtype=torch.float64)
    for name, a, e in zip(("prev", "mean", "log_prob"), outs, ref_outs):
        assert a.shape == e.shape, name
        # log_prob is ~1e4 in size: its tolerance is relative to that size
        assert_close(a, e, log_density_dtype(dtype) if name == "log_prob" else dtype)
    for a, e in zip(grads, ref_grads):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, dtype)
    assert outs[2][0] == 0  # the deterministic sample has no density
