"""The compiled fused DDIM step (rlr_fast._C through rlr_fast/compiled.py) against the reference.

C++ on the CPU everywhere; the CUDA kernels too wherever a GPU is present (bench/gpu_check.sh runs
this file on one, with RLR_FAST_REQUIRE_GPU=1 so that a build without CUDA kernels fails rather
than skips). Comparisons and tolerances: step_cases.py.
"""

import pytest
import torch

from rlr_fast import _C, compiled
from rlr_fast.ddim import ddim_step, ddim_step_reference
from step_cases import (ALL_DTYPES, check_only_needed_gradients, check_step, cotangents, run_step, step_inputs,
                        transposed, with_backend)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(1, 4, 8, 8), (3, 4, 8, 8), (7, 4, 8, 8), (3, 3, 5, 7), (1, 4, 64, 64), (3, 4, 64, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_compiled_matches_reference(device, dtype, shape, cfg):
    """fp16/bf16 computed in fp32 and rounded once; log-densities in fp32 (fp64 for fp64)."""
    check_step(with_backend(device), shape, dtype, device, cfg)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_unaligned_inputs(device):
    shape = (3, 4, 8, 8)
    inputs = transposed(step_inputs(shape, torch.float16, device, cfg=True))
    check_step(with_backend(device), shape, torch.float16, device, True, inputs=inputs)
    # a view one element into its storage: not 16-byte aligned, so the CUDA kernels' scalar path
    flat = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(shape) for t in inputs[:4]]
    check_step(with_backend(device), shape, torch.float16, device, True, inputs=flat + inputs[4:])


@pytest.mark.parametrize("device", DEVICES)
def test_log_prob_is_gaussian_density(device):
    x, u, _, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), torch.float64, device, cfg=False)
    prev, mean, logp = ddim_step(x, u, noise, c_x, c_e, sigma, backend=device)
    for b in range(1, 3):  # sample 0 is deterministic
        dist = torch.distributions.Normal(mean[b], sigma[b].item())
        torch.testing.assert_close(logp[b], dist.log_prob(prev[b]).sum(), atol=1e-9, rtol=1e-12)
    assert logp[0] == 0
    torch.testing.assert_close(prev[0], mean[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [False, True])
def test_gradcheck_float64(device, cfg):
    x, u, c, noise, c_x, c_e, sigma = step_inputs((2, 2, 3, 3), torch.float64, device, cfg)
    sigma[0] = 0.3  # gradcheck the log-density branch on both samples
    args = [t.requires_grad_() for t in (x, u, noise)]
    if cfg:
        args.append(c.requires_grad_())

    def fn(x_, u_, n_, c_=None):
        return ddim_step(x_, u_, n_, c_x, c_e, sigma, model_output_cond=c_, guidance_scale=2.5, backend=device)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wanted", [(True, True, True, True), (False, True, True, False), (True, False, False, False),
                                    (False, False, False, True)])
def test_backward_computes_only_the_gradients_asked_for(device, monkeypatch, wanted):
    """_C is asked for exactly the gradients autograd needs, computes nothing else (None), and the
    ones it computes equal the reference's."""
    calls, real = [], _C.ddim_step_backward

    def spy(*args):
        out = real(*args)
        calls.append((args[-4:], out))
        return out

    monkeypatch.setattr(compiled._C, "ddim_step_backward", spy)
    check_only_needed_gradients(with_backend(device), device, wanted, calls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_absent_cotangents_count_as_zero(device, dtype):
    """A cotangent autograd does not provide (None) gives what an explicit zero gives."""
    x, u, c, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), dtype, device, cfg=True)
    c_x, c_e, sigma = (t.to(device) for t in (c_x, c_e, sigma))
    grad_prev, grad_mean, grad_logp = cotangents((3, 4, 8, 8), dtype, device)
    grad_logp = grad_logp.float()
    needs = (True, True, True, True)
    for absent in range(3):
        given = [grad_prev, grad_mean, grad_logp]
        zeros = list(given)
        given[absent], zeros[absent] = None, torch.zeros_like(given[absent])
        a = _C.ddim_step_backward(*given, noise, 2.0, True, c_x, c_e, sigma, *needs)
        e = _C.ddim_step_backward(*zeros, noise, 2.0, True, c_x, c_e, sigma, *needs)
        for ga, ge in zip(a, e):
            assert torch.equal(ga, ge)


@pytest.mark.parametrize("device", DEVICES)
def test_direct_calls_check_their_inputs(device):
    """_C checks what it is given itself (the wrapper checks too): errors name the input."""
    x, u, c, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), torch.float32, device, cfg=True)
    with pytest.raises(ValueError, match=f"noise is on meta, expected {x.device}"):
        _C.ddim_step_forward(x, u, c, 2.0, noise.to("meta"), c_x, c_e, sigma)
    with pytest.raises(ValueError, match="model_output_cond has shape"):
        _C.ddim_step_forward(x, u, c[:2], 2.0, noise, c_x, c_e, sigma)
    with pytest.raises(TypeError, match="model_output has dtype Double"):
        _C.ddim_step_forward(x, u.double(), c, 2.0, noise, c_x, c_e, sigma)
    with pytest.raises(TypeError, match="sample has dtype Long"):
        _C.ddim_step_forward(x.long(), u.long(), None, 1.0, noise.long(), c_x, c_e, sigma)
    with pytest.raises(ValueError, match=r"sigma must hold one value per sample \(3\)"):
        _C.ddim_step_forward(x, u, None, 1.0, noise, c_x, c_e, sigma[:2])
    with pytest.raises(ValueError, match="non-empty"):
        _C.ddim_step_forward(x[:0], u[:0], None, 1.0, noise[:0], c_x[:0], c_e[:0], sigma[:0])
    grad = torch.ones_like(x)
    with pytest.raises(ValueError, match=f"grad_mean is on meta, expected {x.device} like the noise"):
        _C.ddim_step_backward(grad, grad.to("meta"), None, noise, 2.0, True, c_x, c_e, sigma, True, True, True, True)
    with pytest.raises(ValueError, match=r"grad_logp must hold one value per sample"):
        _C.ddim_step_backward(grad, grad, grad, noise, 2.0, True, c_x, c_e, sigma, True, True, True, True)


def test_coefficients_that_require_grad_are_refused():
    x, u, _, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), torch.float32, "cpu", cfg=False)
    with pytest.raises(ValueError, match="c_e requires grad"):
        ddim_step(x, u, noise, c_x, c_e.requires_grad_(), sigma, backend="cpu")
    # the reference differentiates them
    outs, _ = run_step(ddim_step_reference, (x, u, None, noise, c_x, c_e, sigma), cotangents(x.shape, x.dtype, "cpu"),
                       1.0)
    assert c_e.grad is not None


@pytest.mark.slow
def test_compiled_backend_runs_without_triton():
    """The step's autograd Function (kernels/ddim_step_function.py) is torch only: with triton absent,
    the compiled backend still runs forward and backward, and auto falls back from Triton on a GPU."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from rlr_fast.ddim import ddim_step, resolve_backend\n"
            "x = torch.randn(2, 3, requires_grad=True)\n"
            "prev, _, _ = ddim_step(x, torch.randn(2, 3), torch.randn(2, 3), *[torch.full((2,), 0.5)] * 3, backend='cpu')\n"
            "prev.sum().backward()\n"
            "assert torch.equal(x.grad, torch.full((2, 3), 0.5)), x.grad\n"
            "assert resolve_backend(torch.device('cuda')) != 'triton'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
