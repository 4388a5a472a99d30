"""rlr_fast.ddim: step coefficients, and the dispatcher's one contract on every backend.

Every backend that runs here (the reference, _C's C++, Triton under the interpreter; on a GPU
also Triton compiled and _C's CUDA kernels) returns log-densities in fp32 for fp16/bf16/fp32
inputs and fp64 for fp64, matches the reference forward and backward within step_cases.py's
table, and names the input that sits on another device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton kernels are defined

import pytest  # noqa: E402

from rlr_fast import profiling  # noqa: E402
from rlr_fast.ddim import (ddim_step, gaussian_log_prob, gaussian_log_prob_reference,  # noqa: E402
                           log_density_dtype, resolve_backend)
from rlr_fast.samplers import check_scheduler, step_coefficients  # noqa: E402
from rlr_fast.testing import make_scheduler  # noqa: E402
from step_cases import ALL_DTYPES, assert_close, check_step, step_inputs, with_backend  # noqa: E402

GPU = torch.cuda.is_available()
# backend -> the device its tensors live on in these tests
BACKEND_DEVICES = {"reference": "cuda" if GPU else "cpu", "cpu": "cpu", "triton": "cuda" if GPU else "cpu"}
if GPU:
    BACKEND_DEVICES["cuda"] = "cuda"
BACKENDS_HERE = list(BACKEND_DEVICES)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_every_backend_keeps_the_log_density_contract(backend, dtype):
    """Forward and backward against the float64 reference; log_prob in fp32 (fp64 for fp64)."""
    device = BACKEND_DEVICES[backend]
    x, u, _, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), dtype, device, cfg=False)
    prev, mean, logp = ddim_step(x, u, noise, c_x, c_e, sigma, backend=backend)
    assert prev.dtype == mean.dtype == dtype
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) == log_density_dtype(dtype)
    check_step(with_backend(backend), (3, 4, 8, 8), dtype, device, cfg=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_every_backend_keeps_the_gaussian_log_prob_contract(backend, dtype):
    device = BACKEND_DEVICES[backend]
    g = torch.Generator().manual_seed(2)
    sample, mean = (torch.randn(3, 4, 8, 8, generator=g).to(device, dtype) for _ in range(2))
    sigma = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    leaves = [t.clone().requires_grad_() for t in (sample, mean)]
    logp = gaussian_log_prob(*leaves, sigma, backend=backend)
    logp.backward(torch.arange(1.0, 4.0, device=device, dtype=logp.dtype))
    ref = [t.double().requires_grad_() for t in (sample, mean)]
    expected = gaussian_log_prob_reference(*ref, sigma)
    expected.backward(torch.arange(1.0, 4.0, device=device, dtype=torch.float64))
    assert_close(logp, expected, log_density_dtype(dtype))
    for a, e in zip(leaves, ref):
        assert_close(a.grad, e.grad, dtype)


@pytest.mark.parametrize("which", ["model_output", "noise", "model_output_cond"])
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_every_backend_names_an_input_on_another_device(backend, which):
    device = BACKEND_DEVICES[backend]
    x, u, c, noise, c_x, c_e, sigma = step_inputs((2, 4, 8, 8), torch.float32, device, cfg=True)
    inputs = dict(model_output=u, noise=noise, model_output_cond=c)
    inputs[which] = inputs[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta, expected {x.device} like the sample"):
        ddim_step(x, inputs["model_output"], inputs["noise"], c_x, c_e, sigma,
                  model_output_cond=inputs["model_output_cond"], guidance_scale=3.0, backend=backend)
    if which == "noise":  # the log-density's mean, likewise
        with pytest.raises(ValueError, match=f"mean is on meta, expected {x.device} like the sample"):
            gaussian_log_prob(x, inputs["noise"], sigma, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_coefficients_may_have_any_float_dtype_and_sit_on_the_cpu(backend):
    """Per-sample coefficients are moved to the samples' device (and compute type) by every backend."""
    device = BACKEND_DEVICES[backend]
    x, u, _, noise, c_x, c_e, sigma = step_inputs((2, 4, 8, 8), torch.float32, device, cfg=False)
    on_cpu = [t.to("cpu", torch.float32) for t in (c_x, c_e, sigma)]
    a = ddim_step(x, u, noise, *on_cpu, backend=backend)
    e = ddim_step(x, u, noise, c_x.to(device), c_e.to(device), sigma.to(device), backend=backend)
    for ta, te in zip(a, e):
        assert_close(ta, te, ta.dtype)


def test_compiled_backend_names_must_match_the_device():
    x, u, _, noise, c_x, c_e, sigma = step_inputs((2, 4, 8, 8), torch.float32, "cpu", cfg=False)
    with pytest.raises(ValueError, match="backend 'cuda' runs on cuda tensors, but sample is on cpu"):
        ddim_step(x, u, noise, c_x, c_e, sigma, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_every_call_runs_in_the_ddim_step_nvtx_range(backend):
    """`ncu --nvtx --nvtx-include "ddim_step/"` selects the fused kernel by this range."""
    events = []
    recorder = profiling.NvtxBackend("fake", lambda name: events.append(name), lambda: events.append("pop"))
    profiling.enable_profiling(True, backend=recorder)
    try:
        device = BACKEND_DEVICES[backend]
        x, u, _, noise, c_x, c_e, sigma = step_inputs((2, 4, 8, 8), torch.float32, device, cfg=False)
        ddim_step(x, u, noise, c_x, c_e, sigma, backend=backend)
    finally:
        profiling.enable_profiling(False)
    assert events == ["ddim_step", "pop"]


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
