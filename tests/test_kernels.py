"""The Triton kernels (kernels/, installed as rlr_fast.kernels) against rlr_fast.ddim's references.

On a machine without a GPU the kernels run in the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before the kernels are defined, hence before the imports below);
with a GPU the same tests run natively on CUDA tensors. The references are rlr_fast.ddim's
PyTorch specifications, evaluated in float64 on the upcast inputs: the kernels compute in fp32
(fp64 for fp64 inputs), so the table allows one rounding of each output to its dtype.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import rlr_fast  # noqa: E402
from rlr_fast import _C, ddim  # noqa: E402
import rlr_fast.kernels.ddim_step as triton_step_module  # noqa: E402
import rlr_fast.kernels.gaussian_log_prob as triton_logp_module  # noqa: E402
from rlr_fast.kernels.ddim_step import ddim_step  # noqa: E402
from rlr_fast.kernels.gaussian_log_prob import gaussian_log_prob  # noqa: E402
from rlr_fast.rollout import recompute_steps  # noqa: E402
from rlr_fast.testing import make_scheduler, make_unet  # noqa: E402

# dtype -> (atol, rtol) of a kernel output against the float64 reference rounded once to dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 8e-3),
    torch.float64: (1e-12, 1e-12),
}
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


def _step_inputs(shape, dtype, device, cfg, seed=0):
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


def _cotangents(shape, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype),
            torch.randn(shape[0], generator=g).to(device, dtype))


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def _run_step(fn, inputs, cotangents, w, dtype=None):
    """Outputs and input gradients (sample, model_output, model_output_cond, noise) of one step."""
    x, u, c, noise, c_x, c_e, sigma = inputs
    x, u, c, noise = _leaves((x, u, c, noise), dtype)
    outs = fn(x, u, noise, c_x, c_e, sigma, model_output_cond=c, guidance_scale=w)
    torch.autograd.backward(outs, [t.to(o.dtype) for t, o in zip(cotangents, outs)])
    return outs, [None if t is None else t.grad for t in (x, u, c, noise)]


def _reference_step(x, u, noise, c_x, c_e, sigma, *, model_output_cond=None, guidance_scale=1.0):
    return ddim.ddim_step_reference(x, u, noise, c_x, c_e, sigma, model_output_cond, guidance_scale)


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def _check_step(shape, dtype, device, cfg):
    inputs = _step_inputs(shape, dtype, device, cfg)
    cotangents = _cotangents(shape, dtype, device)
    w = 7.5 if cfg else 1.0
    outs, grads = _run_step(ddim_step, inputs, cotangents, w)
    ref_outs, ref_grads = _run_step(_reference_step, inputs, cotangents, w, dtype=torch.float64)
    for name, a, e in zip(("prev", "mean", "log_prob"), outs, ref_outs):
        assert a.shape == e.shape, name
        # log_prob is ~1e4 in size: its tolerance is relative to that size; it comes back in fp32
        # for fp16/bf16 inputs, whose range and precision a summed log-density outgrows
        _assert_close(a, e, ddim.log_density_dtype(dtype) if name == "log_prob" else dtype)
    for a, e in zip(grads, ref_grads):
        assert (a is None) == (e is None)
        if a is not None:
            _assert_close(a, e, dtype)
    assert outs[2][0] == 0  # the deterministic sample has no density


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_ddim_step_matches_reference(device, dtype, shape, cfg):
    _check_step(shape, dtype, device, cfg)


@pytest.mark.parametrize("batch,dtype,cfg", LATENT_CASES)
def test_ddim_step_matches_reference_on_sd_latents(device, batch, dtype, cfg):
    _check_step((batch, 4, 64, 64), dtype, device, cfg)


def test_ddim_step_float64_is_exact(device):
    _check_step((3, 3, 5, 7), torch.float64, device, cfg=True)


def test_ddim_step_noncontiguous_inputs(device):
    shape = (3, 4, 8, 8)
    inputs = list(_step_inputs(shape, torch.float32, device, cfg=True))
    for i in range(4):  # transposed copies: the same values with strides that are not row-major
        inputs[i] = inputs[i].transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not inputs[i].is_contiguous()
    inputs[4] = torch.stack([inputs[4], inputs[4]], 1)[:, 0]  # a strided coefficient view
    assert not inputs[4].is_contiguous()
    cotangents = _cotangents(shape, torch.float32, device)
    outs, grads = _run_step(ddim_step, inputs, cotangents, 3.0)
    ref_outs, ref_grads = _run_step(_reference_step, inputs, cotangents, 3.0, dtype=torch.float64)
    for a, e in zip(list(outs) + grads, list(ref_outs) + ref_grads):
        _assert_close(a, e, torch.float32)


@pytest.mark.parametrize("cfg", [False, True])
def test_ddim_step_backward_with_partial_cotangents_and_inputs(device, cfg):
    """recompute_steps's pattern: only the mean is used and the sample and noise need no grad."""
    shape = (3, 3, 5, 7)
    x, u, c, noise, c_x, c_e, sigma = _step_inputs(shape, torch.float32, device, cfg)
    grad_mean = _cotangents(shape, torch.float32, device)[1]
    results = []
    for fn in (ddim_step, _reference_step):
        u_leaf, c_leaf = _leaves((u, c))
        _, mean, _ = fn(x, u_leaf, noise, c_x, c_e, sigma, model_output_cond=c_leaf, guidance_scale=5.0)
        mean.backward(grad_mean)
        results.append((mean, u_leaf.grad, None if c is None else c_leaf.grad))
    (mean, gu, gc), (ref_mean, ref_gu, ref_gc) = results
    _assert_close(mean, ref_mean, torch.float32)
    _assert_close(gu, ref_gu, torch.float32)
    if cfg:
        _assert_close(gc, ref_gc, torch.float32)
    # only the log-density's cotangent: the noise gradient is -grad_logp * noise where sigma > 0
    noise_leaf = noise.clone().requires_grad_()
    grad_logp = torch.tensor([2.0, -1.0, 0.5], device=device)
    ddim_step(x, u, noise_leaf, c_x, c_e, sigma)[2].backward(grad_logp)
    expected = -(grad_logp * (sigma.to(device) > 0)).reshape(-1, 1, 1, 1) * noise
    _assert_close(noise_leaf.grad, expected, torch.float32)


def test_reduction_is_reproducible(device):
    inputs = _step_inputs((2, 3, 37, 29), torch.float32, device, cfg=False)  # 4 partials per sample
    first, second = (ddim_step(*inputs[:2], *inputs[3:])[2] for _ in range(2))
    assert torch.equal(first, second)


def test_many_partials_reduce_in_chunks(device, monkeypatch):
    """Small blocks and finalize chunks: 51 partials per sample summed over 13 loop iterations."""
    monkeypatch.setattr(triton_logp_module, "MAX_BLOCK", 64)
    monkeypatch.setattr(triton_logp_module, "FINALIZE_CHUNK", 4)
    shape = (2, 3, 37, 29)
    _check_step(shape, torch.float32, device, cfg=True)
    sample, mean, _ = _logp_inputs(shape, torch.float32, device)
    sigma = torch.tensor([0.7, 1.3], dtype=torch.float64)
    expected = ddim.gaussian_log_prob_reference(sample.double(), mean.double(), sigma)
    _assert_close(gaussian_log_prob(sample, mean, sigma), expected, torch.float32)


# ----------------------------------------------------------------------------------------------
# Gaussian log-density and score


def _logp_inputs(shape, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g).to(device, dtype)
    mean = (sample.double() + 0.3 * torch.randn(shape, generator=g).to(device)).to(dtype)
    sigma = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.5 + 0.2
    return sample, mean, sigma


def _run_logp(fn, sample, mean, sigma, grad, dtype=None):
    sample, mean = _leaves((sample, mean), dtype)
    logp = fn(sample, mean, sigma)
    logp.backward(grad.to(logp.dtype))
    return logp, sample.grad, mean.grad


# fp16 at 4x64x64 included: |log_prob| there (~1e5) is beyond fp16, so it comes back in fp32
LOGP_CASES = [(dtype, shape) for dtype in HALF_AND_SINGLE + [torch.float64]
              for shape in [(1, 4, 8, 8), (7, 4, 8, 8), (3, 3, 5, 7), (2, 3, 37, 29), (2, 4, 64, 64)]]


@pytest.mark.parametrize("dtype,shape", LOGP_CASES)
def test_gaussian_log_prob_matches_reference(device, dtype, shape):
    sample, mean, sigma = _logp_inputs(shape, dtype, device)
    grad = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(device, dtype)
    actual = _run_logp(gaussian_log_prob, sample, mean, sigma, grad)
    expected = _run_logp(ddim.gaussian_log_prob_reference, sample, mean, sigma, grad, dtype=torch.float64)
    _assert_close(actual[0], expected[0], ddim.log_density_dtype(dtype))
    for a, e in zip(actual[1:], expected[1:]):
        _assert_close(a, e, dtype)


def test_gaussian_score_is_the_closed_form(device):
    """d logp / d mean = (sample - mean) / sigma^2 per sample, written out by hand."""
    sample, mean, sigma = _logp_inputs((3, 3, 5, 7), torch.float64, device)
    mean_leaf = mean.clone().requires_grad_()
    gaussian_log_prob(sample, mean_leaf, sigma).sum().backward()
    expected = (sample - mean) / sigma.to(device).reshape(-1, 1, 1, 1) ** 2
    _assert_close(mean_leaf.grad, expected, torch.float64)


def test_kernel_package_references_restate_rlr_fast(device):
    """kernels/ keeps its own copies of the references (it never imports rlr_fast): same math."""
    inputs = _step_inputs((3, 3, 5, 7), torch.float64, device, cfg=True)
    x, u, c, noise, c_x, c_e, sigma = inputs
    own = triton_step_module.ddim_step_reference(x, u, noise, c_x, c_e, sigma, model_output_cond=c,
                                                 guidance_scale=2.5)
    spec = ddim.ddim_step_reference(x, u, noise, c_x, c_e, sigma, c, 2.5)
    for a, e in zip(own, spec):
        _assert_close(a, e, torch.float64)
    sample, mean, sigma = _logp_inputs((3, 3, 5, 7), torch.float64, device)
    _assert_close(triton_logp_module.gaussian_log_prob_reference(sample, mean, sigma),
                  ddim.gaussian_log_prob_reference(sample, mean, sigma), torch.float64)


# ----------------------------------------------------------------------------------------------
# Input checks


def test_bad_inputs_raise_clear_errors(device):
    x, u, _, noise, c_x, c_e, sigma = _step_inputs((3, 4, 8, 8), torch.float32, device, cfg=False)
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
    monkeypatch.setattr(triton_logp_module, "_INTERPRETED", False)
    x, u, _, noise, c_x, c_e, sigma = _step_inputs((1, 4, 8, 8), torch.float32, "cpu", cfg=False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ddim_step(x, u, noise, c_x, c_e, sigma)


# ----------------------------------------------------------------------------------------------
# rlr_fast.ddim's dispatch to the kernels


def test_resolve_backend_prefers_triton_for_cuda(device, monkeypatch):
    monkeypatch.delenv("RLR_FAST_BACKEND", raising=False)
    assert ddim._triton_available()
    assert ddim.resolve_backend(torch.device("cuda")) == "triton"
    assert ddim.resolve_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(ddim, "_triton_available", lambda: False)
    assert ddim.resolve_backend(torch.device("cuda")) == ("cuda" if _C.has_cuda() else "reference")


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
    _assert_close(ddim.gaussian_log_prob(sample, mean, sigma),
                  ddim.gaussian_log_prob_reference(sample.double(), mean.double(), sigma), torch.float32)
    assert len(calls) == 1


def test_ddim_dispatcher_runs_the_kernel_like_the_compiled_op(device):
    inputs = _step_inputs((3, 4, 8, 8), torch.float32, device, cfg=True)
    cotangents = _cotangents((3, 4, 8, 8), torch.float32, device)
    triton_outs, triton_grads = _run_step(lambda *a, **k: ddim.ddim_step(*a, **k, backend="triton"),
                                          inputs, cotangents, 7.5)
    compiled_backend = "cuda" if device == "cuda" else "cpu"
    if device == "cuda" and not _C.has_cuda():
        compiled_backend = "reference"
    outs, grads = _run_step(lambda *a, **k: ddim.ddim_step(*a, **k, backend=compiled_backend),
                            inputs, cotangents, 7.5)
    for a, e in zip(list(triton_outs) + triton_grads, list(outs) + grads):
        _assert_close(a, e, torch.float32)


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
