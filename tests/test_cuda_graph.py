"""CUDA-graph rollouts: the captured step's logic on the CPU, the graph itself on a GPU."""

import pytest
import torch

from rlr_fast import rollout
from rlr_fast.cuda_graph import TOLERANCE, GraphedRollout, rollout_cuda_graph
from rlr_fast.testing import make_scheduler, make_unet


def _inputs(batch=2, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device, dtype)
    cond = torch.randn(batch, 5, 16, generator=g).to(device, dtype)
    negative = torch.randn(1, 5, 16, generator=g).to(device, dtype)
    return x, cond, negative


def _assert_same_trajectory(a, b, exact: bool, tol: float = 0.0):
    for name in ("latents", "noises", "log_probs", "timesteps", "sigmas", "c_x", "c_e"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if exact:
            assert torch.equal(x, y), name
        else:
            scale = y.abs().max().clamp(min=1e-12)
            assert float((x - y).abs().max() / scale) <= tol, name
    assert a.eta == b.eta and a.guidance_scale == b.guidance_scale and a.model_key == b.model_key
    assert torch.equal(a.encoder_hidden_states, b.encoder_hidden_states)


@pytest.mark.parametrize("guidance, split_cfg, spacing", [(1.0, False, "leading"), (7.5, False, "trailing"),
                                                          (7.5, True, "leading")])
@pytest.mark.slow
def test_static_step_equals_eager_rollout_on_cpu(unet, guidance, split_cfg, spacing):
    """The step function a graph would capture, run eagerly on its static buffers, reproduces
    rlr_fast.rollout bit for bit (same ops, same values, same noise draw)."""
    x, cond, negative = _inputs()
    kw = dict(num_steps=6, eta=1.0, encoder_hidden_states=cond, guidance_scale=guidance,
              negative_encoder_hidden_states=negative if guidance != 1.0 else None)
    eager = rollout(unet, make_scheduler(timestep_spacing=spacing), x, generator=torch.Generator().manual_seed(3),
                    split_cfg=split_cfg, **kw)
    static = GraphedRollout(unet, make_scheduler(timestep_spacing=spacing), split_cfg=split_cfg, capture=False)
    got = static(x, generator=torch.Generator().manual_seed(3), **kw)
    _assert_same_trajectory(got, eager, exact=True)
    # the buffers are reused: a second rollout with other noise is again equal to the eager one
    again = static(x, generator=torch.Generator().manual_seed(4), **kw)
    eager2 = rollout(unet, make_scheduler(timestep_spacing=spacing), x, generator=torch.Generator().manual_seed(4),
                     split_cfg=split_cfg, **kw)
    _assert_same_trajectory(again, eager2, exact=True)
    assert not torch.equal(again.latents, got.latents)


def test_static_step_follows_shape_changes(unet):
    static = GraphedRollout(unet, make_scheduler(), capture=False)
    for batch in (1, 3):
        x, cond, _ = _inputs(batch)
        got = static(x, num_steps=3, eta=0.5, encoder_hidden_states=cond, generator=torch.Generator().manual_seed(0))
        eager = rollout(unet, make_scheduler(), x, num_steps=3, eta=0.5, encoder_hidden_states=cond,
                        generator=torch.Generator().manual_seed(0))
        _assert_same_trajectory(got, eager, exact=True)


def test_capture_on_cpu_is_a_clear_error(unet):
    x, cond, _ = _inputs()
    with pytest.raises(RuntimeError, match="CUDA device.*capture=False"):
        rollout_cuda_graph(unet, make_scheduler(), x, num_steps=3, eta=1.0, encoder_hidden_states=cond)


def test_bad_arguments_are_named(unet):
    x, cond, _ = _inputs()
    static = GraphedRollout(unet, make_scheduler(), capture=False)
    with pytest.raises(ValueError, match="needs negative_encoder_hidden_states"):
        static(x, num_steps=3, eta=1.0, encoder_hidden_states=cond, guidance_scale=5.0)
    with pytest.raises(ValueError, match="num_steps must be in"):
        static(x, num_steps=0, eta=1.0, encoder_hidden_states=cond)
    with pytest.raises(ValueError, match="warmup"):
        GraphedRollout(unet, make_scheduler(), warmup=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_graph_rollout_equals_eager_on_gpu(dtype, guidance):
    unet = make_unet().to("cuda", dtype)
    x, cond, negative = _inputs(device="cuda", dtype=dtype)
    kw = dict(num_steps=10, eta=1.0, encoder_hidden_states=cond, guidance_scale=guidance,
              negative_encoder_hidden_states=negative if guidance != 1.0 else None)
    eager = rollout(unet, make_scheduler(), x, generator=torch.Generator("cuda").manual_seed(1), **kw)
    graphed = GraphedRollout(unet, make_scheduler())
    got = graphed(x, generator=torch.Generator("cuda").manual_seed(1), **kw)
    _assert_same_trajectory(got, eager, exact=False, tol=TOLERANCE[dtype])
    # replaying the same graph with other noise: no recapture, still equal
    got2 = graphed(x, generator=torch.Generator("cuda").manual_seed(2), **kw)
    eager2 = rollout(unet, make_scheduler(), x, generator=torch.Generator("cuda").manual_seed(2), **kw)
    _assert_same_trajectory(got2, eager2, exact=False, tol=TOLERANCE[dtype])
    assert graphed.captures == 1
    # an in-place weight update (what the optimizer does) is seen by the replay without recapture
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.01)
    got3 = graphed(x, generator=torch.Generator("cuda").manual_seed(2), **kw)
    eager3 = rollout(unet, make_scheduler(), x, generator=torch.Generator("cuda").manual_seed(2), **kw)
    _assert_same_trajectory(got3, eager3, exact=False, tol=TOLERANCE[dtype])
    assert graphed.captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real NVTX backend needs a GPU")
def test_ranges_reach_a_real_nvtx_backend_on_gpu():
    """With profiling on, a graphed rollout's ranges (and the fused step's) go to the nvtx package
    (carried to the GPU by bench/gpu_wheels.sh) or torch.cuda.nvtx, balanced."""
    import importlib.util

    from rlr_fast import profiling

    real = profiling.find_backend()
    assert real is not None and real.name == ("nvtx" if importlib.util.find_spec("nvtx") else "torch.cuda.nvtx")
    events = []

    def push(name):
        events.append(name)
        return real.push(name)

    def pop():
        events.append("pop")
        return real.pop()

    profiling.enable_profiling(True, backend=profiling.NvtxBackend(real.name, push, pop))
    try:
        x, cond, _ = _inputs(device="cuda")
        GraphedRollout(make_unet().to("cuda"), make_scheduler())(x, num_steps=3, eta=1.0, encoder_hidden_states=cond)
    finally:
        profiling.enable_profiling(False)
    assert events[0] == "graphed rollout" and {"ddim_step", "step 0", "step 2"} <= set(events)
    assert events.count("pop") == len(events) - events.count("pop")
