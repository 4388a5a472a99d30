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


def with_backend(backend):
    """rlr_fast.ddim.ddim_step on one backend, called as the others are."""
    from rlr_fast.ddim import ddim_step

    def step(*args, **kwargs):
        return ddim_step(*args, **kwargs, backend=backend)
    return step


def transposed(inputs):
    """step_inputs with sample, model outputs and noise as copies whose strides are not row-major."""
    inputs = list(inputs)
    for i in range(4):
        if inputs[i] is not None:
            inputs[i] = inputs[i].transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not inputs[i].is_contiguous()
    return inputs


def check_only_needed_gradients(fn, device, wanted, backward_calls):
    """Only `wanted` of (sample, model_output, model_output_cond, noise) require grad: fn's backward
    (recorded in `backward_calls` as (needs, gradients) by a spy) was asked for exactly those,
    computed nothing else, and its gradients equal the reference's."""
    shape = (3, 3, 5, 7)
    x, u, c, noise, c_x, c_e, sigma = step_inputs(shape, torch.float32, device, cfg=True)
    results = []
    for step in (fn, ddim_step_reference):
        ins = [t.clone().requires_grad_(w) for t, w in zip((x, u, c, noise), wanted)]
        outs = step(ins[0], ins[1], ins[3], c_x, c_e, sigma, model_output_cond=ins[2], guidance_scale=2.0)
        # the reference's log-density depends on the noise alone: without it, nothing to back-propagate
        used = [(o, g) for o, g in zip(outs, cotangents(shape, torch.float32, device)) if o.requires_grad]
        torch.autograd.backward(*zip(*used))
        results.append([t.grad for t in ins])
    (needs, grads), = backward_calls
    assert tuple(needs) == tuple(wanted)
    assert [g is not None for g in grads] == list(wanted)
    for a, e in zip(*results):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, torch.float32)
