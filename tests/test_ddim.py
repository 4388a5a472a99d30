"""The compiled fused DDIM step (`rlr_fast._C`, C++) against the PyTorch reference."""

import pytest
import torch

from rlr_fast.ddim import (check_scheduler, ddim_step, resolve_backend,
                           step_coefficients)
from rlr_fast.testing import make_scheduler

# dtype -> (atol, rtol) for compiled vs reference, forward and backward.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}
SHAPES = [(1, 4, 8, 8), (3, 4, 8, 8), (7, 4, 8, 8), (1, 4, 64, 64), (3, 4, 64, 64), (7, 4, 64, 64)]


def _inputs(shape, dtype, cfg, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]

    def rnd(*s):
        if noncontiguous:  # a transposed view: same values, strides that are not row-major
            s2 = s[:-2] + (s[-1], s[-2])
            return torch.randn(s2, generator=g, dtype=dtype).transpose(-1, -2)
        return torch.randn(s, generator=g, dtype=dtype)

    x, u, noise = rnd(*shape), rnd(*shape), rnd(*shape)
    c = rnd(*shape) if cfg else None
    c_x = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    c_e = torch.randn(b, generator=g, dtype=torch.float64)
    sigma = torch.rand(b, generator=g, dtype=torch.float64)
    sigma[0] = 0.0  # a deterministic sample in every batch: no density, no noise
    return x, u, c, noise, c_x, c_e, sigma


def _run(backend, x, u, c, noise, c_x, c_e, sigma, w):
    leaves = [t.detach().clone().requires_grad_() for t in (x, u, noise)]
    cl = c.detach().clone().requires_grad_() if c is not None else None
    prev, mean, logp = ddim_step(leaves[0], leaves[1], leaves[2], c_x, c_e, sigma,
                                 model_output_cond=cl, guidance_scale=w, backend=backend)
    g = torch.Generator().manual_seed(1)
    gp, gm = torch.randn(prev.shape, generator=g, dtype=prev.dtype), torch.randn(mean.shape, generator=g, dtype=prev.dtype)
    gl = torch.randn(logp.shape, generator=g, dtype=prev.dtype)
    torch.autograd.backward([prev, mean, logp], [gp, gm, gl])
    grads = [t.grad for t in leaves] + ([cl.grad] if cl is not None else [])
    return (prev, mean, logp), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_compiled_matches_reference(dtype, shape, cfg):
    inputs = _inputs(shape, dtype, cfg)
    w = 7.5 if cfg else 1.0
    out_c, grads_c = _run("cpu", *inputs, w)
    out_r, grads_r = _run("reference", *inputs, w)
    atol, rtol = TOLERANCES[dtype]
    for a, b in zip(out_c, out_r):
        torch.testing.assert_close(a, b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol)
    for a, b in zip(grads_c, grads_r):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("cfg", [False, True])
def test_noncontiguous_inputs(cfg):
    inputs = _inputs((3, 4, 8, 8), torch.float32, cfg, noncontiguous=True)
    assert not inputs[0].is_contiguous()
    out_c, grads_c = _run("cpu", *inputs, 3.0)
    out_r, grads_r = _run("reference", *inputs, 3.0)
    for a, b in zip(out_c + tuple(grads_c), out_r + tuple(grads_r)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_log_prob_is_gaussian_density():
    x, u, c, noise, c_x, c_e, sigma = _inputs((3, 4, 8, 8), torch.float64, False)
    prev, mean, logp = ddim_step(x, u, noise, c_x, c_e, sigma, backend="cpu")
    for b in range(1, 3):  # sample 0 is deterministic
        dist = torch.distributions.Normal(mean[b], sigma[b].item())
        torch.testing.assert_close(logp[b], dist.log_prob(prev[b]).sum(), atol=1e-9, rtol=1e-12)
    assert logp[0] == 0
    torch.testing.assert_close(prev[0], mean[0])


@pytest.mark.parametrize("cfg", [False, True])
def test_gradcheck_float64(cfg):
    x, u, c, noise, c_x, c_e, sigma = _inputs((2, 2, 3, 3), torch.float64, cfg)
    sigma[0] = 0.3  # gradcheck the log-density branch on both samples
    args = [t.requires_grad_() for t in (x, u, noise)]
    if cfg:
        c.requires_grad_()
        fn = lambda x_, u_, n_, c_: ddim_step(x_, u_, n_, c_x, c_e, sigma, model_output_cond=c_,
                                              guidance_scale=2.5, backend="cpu")
        args.append(c)
    else:
        fn = lambda x_, u_, n_: ddim_step(x_, u_, n_, c_x, c_e, sigma, backend="cpu")
    assert torch.autograd.gradcheck(fn, args)


def test_backend_resolution():
    assert resolve_backend(torch.device("cpu")) == "cpu"
    assert resolve_backend(torch.device("cpu"), "reference") == "reference"
    with pytest.raises(ValueError, match="unknown ddim backend 'fast'"):
        resolve_backend(torch.device("cpu"), "fast")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_coefficients_reproduce_scheduler_step(prediction_type, eta):
    sched = make_scheduler(prediction_type=prediction_type)
    sched.set_timesteps(10)
    coef = step_coefficients(sched, eta)
    # diffusers keeps alphas_cumprod in float32; in float64 its step is exact enough to compare
    # our folded coefficients tightly (the float32 rollout is compared in test_rollout.py)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, m, n = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for k, t in enumerate(sched.timesteps):
        want = sched.step(m, t, x, eta=eta, variance_noise=n).prev_sample
        got = coef.c_x[k] * x + coef.c_e[k] * m + coef.sigmas[k] * n
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_scheduler_errors():
    from diffusers import PNDMScheduler

    with pytest.raises(TypeError, match="DDIMScheduler.from_config"):
        check_scheduler(PNDMScheduler())
    with pytest.raises(ValueError, match="clip_sample"):
        check_scheduler(make_scheduler(clip_sample=True))
