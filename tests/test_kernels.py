"""The Triton kernels (kernels/, installed as rlr_fast.kernels) against the reference (kernels/reference.py).

On a machine without a GPU the kernels run in the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before the kernels are defined, hence before the imports below);
with a GPU the same tests run natively on CUDA tensors. Comparisons and tolerances: step_cases.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import rlr_fast  # noqa: E402
from rlr_fast import compiled, ddim  # noqa: E402
import rlr_fast.kernels.ddim_step as triton_step_module  # noqa: E402
import rlr_fast.kernels.gaussian_log_prob as triton_logp_module  # noqa: E402
import rlr_fast.kernels.utils as kernel_utils  # noqa: E402
from rlr_fast.kernels.ddim_step import ddim_step  # noqa: E402
from rlr_fast.kernels.gaussian_log_prob import gaussian_log_prob  # noqa: E402
from rlr_fast.rollout import recompute_steps  # noqa: E402
from rlr_fast.testing import make_scheduler, make_unet  # noqa: E402
from step_cases import (assert_close, check_only_needed_gradients, check_step, cotangents, leaves,  # noqa: E402
                        run_step, step_inputs, transposed)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, C, H, W): batches 1, 3, 7; SD latents 4x64x64 (16 blocks, so a multi-partial reduction);
# D = 105, below one block and not a power of two; D = 3219, several blocks and a ragged tail.
SMALL_SHAPES = [(1, 4, 8, 8), (3, 4, 8, 8), (7, 4, 8, 8), (3, 3, 5, 7), (2, 3, 37, 29)]
# 4x64x64 costs seconds per call in the interpreter: fewer combinations there
LATENT_CASES = [(1, torch.float32, True), (2, torch.float32, False), (1, torch.float16, True),
                (1, torch.bfloat16, False)]
HALF_AND_SINGLE = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = [
    pytest.mark.parametrize("device", [DEVICE]),
    # the interpreter evaluates log(sigma) before masking the sigma == 0 samples
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.slow
def test_ddim_step_matches_reference(device, dtype, shape, cfg):
    check_step(ddim_step, shape, dtype, device, cfg)


@pytest.mark.parametrize("batch,dtype,cfg", LATENT_CASES)
@pytest.mark.slow
def test_ddim_step_matches_reference_on_sd_latents(device, batch, dtype, cfg):
    check_step(ddim_step, (batch, 4, 64, 64), dtype, device, cfg)


def test_ddim_step_float64_is_exact(device):
    check_step(ddim_step, (3, 3, 5, 7), torch.float64, device, cfg=True)


def test_ddim_step_noncontiguous_inputs(device):
    shape = (3, 4, 8, 8)
    inputs = transposed(step_inputs(shape, torch.float32, device, cfg=True))
    inputs[4] = torch.stack([inputs[4], inputs[4]], 1)[:, 0]  # a strided coefficient view
    assert not inputs[4].is_contiguous()
    cots = cotangents(shape, torch.float32, device)
    outs, grads = run_step(ddim_step, inputs, cots, 3.0)
    ref_outs, ref_grads = run_step(ddim.ddim_step_reference, inputs, cots, 3.0, dtype=torch.float64)
    for a, e in zip(list(outs) + grads, list(ref_outs) + ref_grads):
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize("cfg", [False, True])
def test_ddim_step_backward_with_partial_cotangents_and_inputs(device, cfg):
    """recompute_steps's pattern: only the mean is used and the sample and noise need no grad."""
    shape = (3, 3, 5, 7)
    x, u, c, noise, c_x, c_e, sigma = step_inputs(shape, torch.float32, device, cfg)
    grad_mean = cotangents(shape, torch.float32, device)[1]
    results = []
    for fn in (ddim_step, ddim.ddim_step_reference):
        u_leaf, c_leaf = leaves((u, c))
        _, mean, _ = fn(x, u_leaf, noise, c_x, c_e, sigma, model_output_cond=c_leaf, guidance_scale=5.0)
        mean.backward(grad_mean)
        results.append((mean, u_leaf.grad, None if c is None else c_leaf.grad))
    (mean, gu, gc), (ref_mean, ref_gu, ref_gc) = results
    assert_close(mean, ref_mean, torch.float32)
    assert_close(gu, ref_gu, torch.float32)
    if cfg:
        assert_close(gc, ref_gc, torch.float32)
    # only the log-density's cotangent: the noise gradient is -grad_logp * noise where sigma > 0
    noise_leaf = noise.clone().requires_grad_()
    grad_logp = torch.tensor([2.0, -1.0, 0.5], device=device)
    ddim_step(x, u, noise_leaf, c_x, c_e, sigma)[2].backward(grad_logp)
    expected = -(grad_logp * (sigma.to(device) > 0)).reshape(-1, 1, 1, 1) * noise
    assert_close(noise_leaf.grad, expected, torch.float32)


def _spy(monkeypatch, module, name):
    """Record what module.name is called with (its last positional argument) and returns."""
    calls, real = [], getattr(module, name)

    def spy(*args):
        out = real(*args)
        calls.append((args[-1], out))
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("wanted", [(True, True, True, True), (False, True, True, False), (True, False, False, True),
                                    (False, False, False, True)])
def test_ddim_step_backward_computes_only_the_gradients_asked_for(device, monkeypatch, wanted):
    """Inputs that need no grad get none computed: the launcher is asked for exactly the needed
    gradients, returns None for the others, and the needed ones equal the reference's."""
    check_only_needed_gradients(ddim_step, device, wanted, _spy(monkeypatch, triton_step_module, "ddim_step_backward"))


@pytest.mark.parametrize("wanted", [(True, False), (False, True)])
def test_gaussian_log_prob_backward_computes_only_the_gradients_asked_for(device, monkeypatch, wanted):
    calls = _spy(monkeypatch, triton_logp_module, "gaussian_log_prob_backward")
    sample, mean, sigma = _logp_inputs((3, 3, 5, 7), torch.float32, device)
    ins = [t.clone().requires_grad_(w) for t, w in zip((sample, mean), wanted)]
    gaussian_log_prob(*ins, sigma).sum().backward()
    (need_mean, grads), = calls
    assert [g is not None for g in grads] == list(wanted) and need_mean == wanted[1]
    assert [t.grad is not None for t in ins] == list(wanted)


def test_reduction_is_reproducible(device):
    inputs = step_inputs((2, 3, 37, 29), torch.float32, device, cfg=False)  # 4 partials per sample
    first, second = (ddim_step(*inputs[:2], *inputs[3:])[2] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.slow
def test_many_partials_reduce_in_chunks(device, monkeypatch):
    """Small blocks and finalize chunks: 51 partials per sample summed over 13 loop iterations."""
    monkeypatch.setattr(kernel_utils, "MAX_BLOCK", 64)
    monkeypatch.setattr(kernel_utils, "FINALIZE_CHUNK", 4)
    shape = (2, 3, 37, 29)
    check_step(ddim_step, shape, torch.float32, device, cfg=True)
    sample, mean, _ = _logp_inputs(shape, torch.float32, device)
    sigma = torch.tensor([0.7, 1.3], dtype=torch.float64)
    expected = ddim.gaussian_log_prob_reference(sample.double(), mean.double(), sigma)
    assert_close(gaussian_log_prob(sample, mean, sigma), expected, torch.float32)


# ----------------------------------------------------------------------------------------------
# Gaussian log-density and score


def _logp_inputs(shape, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g).to(device, dtype)
    mean = (sample.double() + 0.3 * torch.randn(shape, generator=g).to(device)).to(dtype)
    sigma = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.5 + 0.2
    return sample, mean, sigma


def _run_logp(fn, sample, mean, sigma, grad, dtype=None):
    sample, mean = leaves((sample, mean), dtype)
    logp = fn(sample, mean, sigma)
    logp.backward(grad.to(logp.dtype))
    return logp, sample.grad, mean.grad


# fp16 at 4x64x64 included: |log_prob| there (~1e5) is beyond fp16, so it comes back in fp32
LOGP_CASES = [(dtype, shape) for dtype in HALF_AND_SINGLE + [torch.float64]
              for shape in [(1, 4, 8, 8), (7, 4, 8, 8), (3, 3, 5, 7), (2, 3, 37, 29), (2, 4, 64, 64)]]


@pytest.mark.parametrize("dtype,shape", LOGP_CASES)
@pytest.mark.slow
def test_gaussian_log_prob_matches_reference(device, dtype, shape):
    sample, mean, sigma = _logp_inputs(shape, dtype, device)
    grad = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(device, dtype)
    actual = _run_logp(gaussian_log_prob, sample, mean, sigma, grad)
    expected = _run_logp(ddim.gaussian_log_prob_reference, sample, mean, sigma, grad, dtype=torch.float64)
    assert_close(actual[0], expected[0], ddim.log_density_dtype(dtype))
    for a, e in zip(actual[1:], expected[1:]):
        assert_close(a, e, dtype)


def test_gaussian_score_is_the_closed_form(device):
    """d logp / d mean = (sample - mean) / sigma^2 per sample, written out by hand."""
    sample, mean, sigma = _logp_inputs((3, 3, 5, 7), torch.float64, device)
    mean_leaf = mean.clone().requires_grad_()
    gaussian_log_prob(sample, mean_leaf, sigma).sum().backward()
    expected = (sample - mean) / sigma.to(device).reshape(-1, 1, 1, 1) ** 2
    assert_close(mean_leaf.grad, expected, torch.float64)


# ----------------------------------------------------------------------------------------------
# Input checks


def test_bad_inputs_raise_clear_errors(device):
    x, u, _, noise, c_x, c_e, sigma = step_inputs((3, 4, 8, 8), torch.float32, device, cfg=False)
    with pytest.raises(ValueError, match="noise has shape"):
        ddim_step(x, u, noise[:2], c_x, c_e, sigma)
    with pytest.raises(TypeError, match="model_output has dtype"):
        ddim_step(x, u.double(), noise, c_x, c_e, sigma)
    with pytest.raises(TypeError, match="sample has dtype torch.int64"):
        ddim_step(x.long(), u.long(), noise.long(), c_x, c_e, sigma)
    with pytest.raises(ValueError, match="c_e must hold one value per sample"):
        ddim_step(x, u, noise, c_x, c_e[:2], sigma)
    with pytest.raises(TypeError, match="guidance_scale"):
        ddim_step(x, u, noise, c_x, c_e, sigma, model_output_cond=u, guidance_scale="7.5")
    with pytest.raises(ValueError, match="sigma requires grad"):
        gaussian_log_prob(x, u, sigma.clone().requires_grad_())
    with pytest.raises(ValueError, match="non-empty"):
        gaussian_log_prob(x[:0], u[:0], sigma[:0])


def test_cpu_tensors_without_interpreter_are_refused(device, monkeypatch):
    monkeypatch.setattr(kernel_utils, "INTERPRETED", False)
    x, u, _, noise, c_x, c_e, sigma = step_inputs((1, 4, 8, 8), torch.float32, "cpu", cfg=False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ddim_step(x, u, noise, c_x, c_e, sigma)


# ----------------------------------------------------------------------------------------------
# rlr_fast.ddim's dispatch to the kernels


def test_resolve_backend_prefers_triton_for_cuda(device, monkeypatch):
    monkeypatch.delenv("RLR_FAST_BACKEND", raising=False)
    assert ddim.triton_available()
    assert ddim.resolve_backend(torch.device("cuda")) == "triton"
    assert ddim.resolve_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(ddim, "triton_available", lambda: False)
    assert ddim.resolve_backend(torch.device("cuda")) == ("cuda" if compiled.has_cuda() else "reference")


def test_gaussian_log_prob_dispatcher(device, monkeypatch):
    calls, kernel = [], triton_logp_module.gaussian_log_prob

    def spy(*args):
        calls.append(args)
        return kernel(*args)

    monkeypatch.setattr(triton_logp_module, "gaussian_log_prob", spy)
    monkeypatch.delenv("RLR_FAST_BACKEND", raising=False)
    sample, mean, sigma = _logp_inputs((3, 4, 8, 8), torch.float32, "cpu")
    # CPU tensors resolve to the "cpu" backend, which has no compiled op for this: the reference
    assert torch.equal(ddim.gaussian_log_prob(sample, mean, sigma),
                       ddim.gaussian_log_prob_reference(sample, mean, sigma))
    assert not calls
    # wherever resolve_backend answers "triton" (CUDA tensors by default) the kernel runs
    monkeypatch.setenv("RLR_FAST_BACKEND", "triton")
    sample, mean = sample.to(device), mean.to(device)
    assert_close(ddim.gaussian_log_prob(sample, mean, sigma),
                  ddim.gaussian_log_prob_reference(sample.double(), mean.double(), sigma), torch.float32)
    assert len(calls) == 1


def test_ddim_dispatcher_runs_the_kernel_like_the_compiled_op(device):
    inputs = step_inputs((3, 4, 8, 8), torch.float32, device, cfg=True)
    cots = cotangents((3, 4, 8, 8), torch.float32, device)
    triton_outs, triton_grads = run_step(lambda *a, **k: ddim.ddim_step(*a, **k, backend="triton"),
                                         inputs, cots, 7.5)
    compiled_backend = "cuda" if device == "cuda" else "cpu"
    if device == "cuda" and not compiled.has_cuda():
        compiled_backend = "reference"
    outs, grads = run_step(lambda *a, **k: ddim.ddim_step(*a, **k, backend=compiled_backend),
                           inputs, cots, 7.5)
    for a, e in zip(list(triton_outs) + triton_grads, list(outs) + grads):
        assert_close(a, e, torch.float32)


def test_recompute_steps_log_prob_through_the_kernel(device):
    """The DDPO numerator in recompute_steps, Triton kernel vs the reference, values and grads."""
    unet = make_unet().to(device)
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(2, 77, 16, generator=g).to(device)
    traj = rlr_fast.rollout(unet, make_scheduler(), torch.randn(2, 4, 8, 8, generator=g).to(device),
                            num_steps=3, eta=1.0, encoder_hidden_states=cond,
                            generator=torch.Generator().manual_seed(5))
    results = []
    for backend in ("triton", "reference"):
        sample = traj.latents[[0, 1]].clone().requires_grad_()
        _, logp = recompute_steps(unet, traj, [0, 1], sample, backend=backend, with_log_prob=True)
        logp.sum().backward()
        results.append((logp, sample.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)
