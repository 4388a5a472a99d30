"""Text-to-video: rollout and estimators on 5-D latents (B, C, F, H, W), video UNets loaded from local
diffusers folders, LoRA files the stock video pipelines load, and finetune on them (video rewards:
test_video_rewards.py).

Models are tiny and random (`rlr_fast.video.tiny_video`), built on the CPU in the test.
"""

import importlib
import json
import math

import pytest
import safetensors.torch
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, TextToVideoSDPipeline, UNetMotionModel

import rlr_fast
from rlr_fast import models, video
from rlr_fast import lora
from rlr_fast.config import Config
from rlr_fast.inference import initial_noise
from rlr_fast.rollout import recompute_steps
from rlr_fast.testing import (TOY_SCHEDULE, LinearEps, exact_loss_gradient, make_scheduler, naive_backprop,
                              quadratic_reward)
from rlr_fast.train import finetune

FRAMES = 3
KINDS = ("modelscope", "animatediff")


def _cond(batch, seed, tokens=5, dim=32):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


def _lora_unet(kind, rank=2, alpha=2, dtype=torch.float32):
    unet = video.tiny_video_unet(kind).to(dtype)
    lora.add_lora(unet, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(3)
    for p in lora.lora_parameters(unet):  # peft zeroes lora_B: random weights give every coordinate a gradient
        p.data = 0.1 * torch.randn(p.shape, generator=g).to(dtype)
    return unet


@pytest.fixture(scope="module", params=KINDS)
def lora_unet(request):
    return _lora_unet(request.param)


def _traj(unet, steps, *, batch=2, guidance=1.0, eta=1.0, seed=0, scheduler=None):
    dtype = next(unet.parameters()).dtype
    x_T = torch.randn(batch, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    cfg = (dict(negative_encoder_hidden_states=_cond(batch, 2).to(dtype), guidance_scale=guidance)
           if guidance != 1.0 else {})
    return rlr_fast.rollout(unet, scheduler or make_scheduler(), x_T, num_steps=steps, eta=eta,
                            encoder_hidden_states=_cond(batch, 1).to(dtype),
                            generator=torch.Generator().manual_seed(seed + 1), **cfg)


def _reward(x0):
    return -x0.pow(2).flatten(1).mean(1)


def _grads(unet):
    return torch.cat([p.grad.flatten() for p in lora.lora_parameters(unet)])


# ---- rollout: diffusers' own steps on 5-D latents ---------------------------------------------------


def _pipeline_eps(unet, x, t, cond, negative, guidance):
    """The noise prediction as the stock pipelines compute it: one batch of [negative, cond], AnimateDiff's
    prompt embeddings repeated per frame (AnimateDiffPipeline: prompt_embeds.repeat_interleave(num_frames))."""
    h = torch.cat([negative, cond]) if guidance != 1.0 else cond
    if isinstance(unet, UNetMotionModel):
        h = h.repeat_interleave(x.shape[2], dim=0)
    eps = unet(torch.cat([x, x]) if guidance != 1.0 else x, t, encoder_hidden_states=h).sample
    if guidance == 1.0:
        return eps
    e_u, e_c = eps.chunk(2)
    return e_u + guidance * (e_c - e_u)


def _pipeline_step(scheduler, eps, t, x, noise, eta):
    """TextToVideoSDPipeline's step: frames folded into the batch, (B * F, C, H, W), and back."""
    b, c, f, h, w = x.shape
    fold = lambda v: v.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    prev = scheduler.step(fold(eps), t, fold(x), eta=eta, variance_noise=fold(noise)).prev_sample
    return prev.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("kind, eta, guidance", [("modelscope", 0.0, 1.0), ("modelscope", 1.0, 5.0),
                                                 ("animatediff", 0.7, 5.0)])
@pytest.mark.slow
def test_rollout_equals_diffusers_ddim_steps(kind, eta, guidance):
    unet = video.tiny_video_unet(kind)
    traj = _traj(unet, 5, eta=eta, guidance=guidance)
    assert traj.latents.shape == (6, 2, 4, FRAMES, 8, 8) and traj.log_probs.shape == (5, 2)
    cond, negative = traj.encoder_hidden_states, traj.negative_encoder_hidden_states
    ref = make_scheduler()
    ref.set_timesteps(5)
    x = traj.latents[0]
    with torch.no_grad():
        for k, t in enumerate(ref.timesteps):
            x_k = traj.latents[k]
            want = _pipeline_step(ref, _pipeline_eps(unet, x_k, t, cond, negative, guidance), t, x_k,
                                  traj.noises[k], eta)
            torch.testing.assert_close(traj.latents[k + 1], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            # the whole chain run by the pipeline's loop from x_T stays on ours
            x = _pipeline_step(ref, _pipeline_eps(unet, x, t, cond, negative, guidance), t, x, traj.noises[k], eta)
    torch.testing.assert_close(traj.x0, x, rtol=1e-4, atol=1e-4 * x.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_static_step_rollout_equals_rollout(kind):
    """The CUDA-graph rollout's static step (run eagerly here: capture=False) on video latents."""
    from rlr_fast.cuda_graph import GraphedRollout

    unet = video.tiny_video_unet(kind)
    want = _traj(unet, 3, guidance=3.0)
    graphed = GraphedRollout(unet, make_scheduler(), capture=False)
    got = graphed(want.latents[0], num_steps=3, eta=1.0, encoder_hidden_states=want.encoder_hidden_states,
                  negative_encoder_hidden_states=want.negative_encoder_hidden_states, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.log_probs, want.log_probs)


@pytest.mark.slow
def test_recompute_is_exact_on_video_latents(lora_unet):
    traj = _traj(lora_unet, 4, guidance=3.0)
    means = recompute_steps(lora_unet, traj, [3, 0, 2])
    for i, k in enumerate([3, 0, 2]):
        prev = means[i] + traj.sigmas[k].float() * traj.noises[k]
        torch.testing.assert_close(prev, traj.latents[k + 1], rtol=1e-5, atol=1e-5)


def test_video_unet_refuses_image_latents():
    unet = video.tiny_video_unet("modelscope")
    with pytest.raises(ValueError, match=r"UNet3DConditionModel takes latents \(batch, 4, frames, height, width\), "
                                         r"got shape \(2, 4, 8, 8\) \(rank 4\)"):
        rlr_fast.rollout(unet, make_scheduler(), torch.zeros(2, 4, 8, 8), num_steps=2, eta=0.0,
                         encoder_hidden_states=_cond(2, 0))


# ---- estimators ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_estimator_runs_and_keeps_one_step_resident(lora_unet):
    """Activation memory flat in T for every method, and the naive graph growing with T."""
    for method in ("rlr", "zo", "full_bp", "truncated_bp", "ddpo"):
        peaks = {}
        for steps in (3, 9):
            traj = _traj(lora_unet, steps)
            lora_unet.zero_grad(set_to_none=True)
            own = {"rlr": dict(h=2), "truncated_bp": dict(truncated_bp_k=2)}.get(method, {})
            stats = rlr_fast.estimate(lora_unet, traj, _reward, method=method, **own,
                                      generator=torch.Generator().manual_seed(0), track_memory=True)
            peaks[steps] = stats["peak_saved_bytes"]
            assert torch.isfinite(_grads(lora_unet)).all() and _grads(lora_unet).abs().sum() > 0, method
        assert max(peaks.values()) <= 1.25 * min(peaks.values()), (method, peaks)
    naive = {}
    for steps in (3, 6):
        lora_unet.zero_grad(set_to_none=True)
        traj = _traj(lora_unet, steps, batch=1)
        naive[steps] = naive_backprop(lora_unet, traj, _reward, track_memory=True)["peak_saved_bytes"]
    assert 1.8 <= naive[6] / naive[3] <= 2.2 and naive[6] > 3 * peaks[9]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_sweep_equals_one_graph_backprop(kind):
    """In float64. The sweep (split guidance, one step at a time) and one graph over the chain sum in
    different orders, which costs 8 to 12 eps * max|g| in either dtype (measured on both UNets): in
    float32 1.2e-6 * max|g|, as much as a real error of that size; in float64 2.6e-15 * max|g| at most.
    1e3 eps * max|g| leaves ~100x of that for other CPUs and fails any error above 2.2e-13 * max|g|."""
    unet = _lora_unet(kind, dtype=torch.float64)
    traj = _traj(unet, 4, guidance=3.0)
    rlr_fast.estimate(unet, traj, _reward, method="full_bp", split_cfg=True)
    sweep = _grads(unet).clone()
    unet.zero_grad(set_to_none=True)
    naive_backprop(unet, traj, _reward)
    one_graph = _grads(unet)
    atol = 1e3 * torch.finfo(torch.float64).eps * one_graph.abs().max().item()
    torch.testing.assert_close(sweep, one_graph, rtol=0, atol=atol)


@pytest.mark.slow
def test_checkpoint_unet_on_animatediff_same_gradient_less_memory():
    unet = _lora_unet("animatediff")
    traj = _traj(unet, 3)
    out = {}
    for ckpt in (False, True):
        unet.zero_grad(set_to_none=True)
        stats = rlr_fast.estimate(unet, traj, _reward, method="full_bp", checkpoint_unet=ckpt, track_memory=True)
        out[ckpt] = (_grads(unet).clone(), stats["peak_saved_bytes"])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-8)
    assert out[True][1] < 0.7 * out[False][1]
    assert not unet.is_gradient_checkpointing


def test_checkpoint_unet_on_modelscope_is_a_clear_error_that_applies_nothing():
    unet = _lora_unet("modelscope")
    traj = _traj(unet, 2)
    with pytest.raises(ValueError, match="checkpoint_unet=True, but UNet3DConditionModel has no gradient "
                                         "checkpointing of its own; set checkpoint_unet=False"):
        rlr_fast.estimate(unet, traj, _reward, method="full_bp", checkpoint_unet=True)
    assert all(p.grad is None for p in lora.lora_parameters(unet))


# The linear-Gaussian toy on samples shaped (C, F, H, W): E[R] and its gradient in closed form
# (rlr_fast.testing). z-test as in test_estimators.py: N estimates, 48 coordinates, |z| < 4 (false
# alarm below 48 * 6.3e-5 = 3e-3 per configuration under the null).
TOY_SHAPE = (2, 3, 1, 2)
TOY_TARGET = torch.linspace(-0.5, 0.5, 12, dtype=torch.float64).reshape(TOY_SHAPE)


def _toy_estimates(method, n, batch=4, steps=6, **options):
    sched = make_scheduler(**TOY_SCHEDULE)
    model = LinearEps(sched.alphas_cumprod, TOY_SHAPE)
    exact = exact_loss_gradient(model, sched, steps, 1.0, TOY_TARGET)
    g = torch.Generator().manual_seed(0)
    out = torch.empty(n, exact.numel(), dtype=torch.float64)
    for i in range(n):
        x_T = torch.randn((batch,) + TOY_SHAPE, generator=g, dtype=torch.float64)
        traj = rlr_fast.rollout(model, sched, x_T, num_steps=steps, eta=1.0, generator=g)
        model.zero_grad(set_to_none=True)
        rlr_fast.estimate(model, traj, quadratic_reward(TOY_TARGET), method=method, generator=g, **options)
        out[i] = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out, exact


@pytest.mark.parametrize("method, options", [
    ("full_bp", {}),
    ("rlr", dict(h=2, zo_steps=2, baseline="loo")),
    ("rlr", dict(first_order_steps=1, h=3, baseline="loo")),
    ("zo", dict(baseline="loo")),
])
@pytest.mark.slow
def test_estimators_unbiased_on_video_shaped_toy(method, options):
    est, exact = _toy_estimates(method, n=800, **options)
    z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(est.shape[0]))
    assert float(z.abs().max()) < 4.0


def test_ddpo_on_video_shaped_toy_matches_its_surrogate():
    sched = make_scheduler()
    model = LinearEps(sched.alphas_cumprod, TOY_SHAPE)
    traj = rlr_fast.rollout(model, sched, torch.randn((4,) + TOY_SHAPE, dtype=torch.float64), num_steps=4,
                            eta=1.0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # move the policy so ratios differ from 1 and some clip
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    stats = rlr_fast.estimate(model, traj, quadratic_reward(TOY_TARGET), method="ddpo", advantages=adv,
                              clip_range=0.05)
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert 0 < stats["clip_fraction"] < 1
    model.zero_grad(set_to_none=True)
    loss = 0
    for k in range(4):
        dist = torch.distributions.Normal(rlr_fast.recompute_step(model, traj, k), traj.sigmas[k])
        # per-element-mean log-densities, as ddpo-pytorch: the summed ones over the D latent elements, / D
        elements = traj.latents[k + 1][0].numel()
        ratio = ((dist.log_prob(traj.latents[k + 1]).flatten(1).sum(1) - traj.log_probs[k]) / elements).exp()
        loss = loss + torch.maximum(-adv * ratio, -adv * ratio.clamp(0.95, 1.05)).mean() / 4
    loss.backward()
    torch.testing.assert_close(ours, torch.cat([p.grad.flatten() for p in model.parameters()]),
                               rtol=1e-6, atol=1e-9)


# ---- folders and LoRA files the stock pipelines read --------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: folder} of tiny_video(kind).save_pretrained; tests must not write into them."""
    out = {}
    for kind in KINDS:
        out[kind] = tmp_path_factory.mktemp(kind)
        video.tiny_video(kind).save_pretrained(out[kind])
    return out


def _assert_same_weights(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _in_fresh_memory(unet):
    """`unet` with every weight copied, bit for bit, into a fresh allocation.

    from_pretrained leaves the weights in its memory map of the safetensors file, where they start
    8 + header-length bytes in: the AnimateDiff UNet's at 8 mod 16. MKL's AVX-512 matrix-vector
    product (the batch-1 time embedding here) rounds differently for an operand off a 16-byte
    boundary, so equal weights there give outputs a few ulp apart. A fresh allocation is 64-byte
    aligned, as the in-memory model's is: same kernels, bit-equal outputs.
    """
    for t in list(unet.parameters()) + list(unet.buffers()):
        t.data = t.data.clone()
    return unet


def _eps(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(1, 4, FRAMES, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    if isinstance(unet, UNetMotionModel):
        h = h.repeat_interleave(FRAMES, dim=0)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=h).sample


@pytest.mark.parametrize("kind", KINDS)
def test_load_video_round_trips_the_saved_folder(folders, kind):
    loaded = video.load_video(folders[kind])
    pipeline = {"modelscope": "TextToVideoSDPipeline", "animatediff": "AnimateDiffPipeline"}[kind]
    assert video.is_video_folder(folders[kind]) and loaded.pipeline_class == pipeline
    saved = video.tiny_video(kind).unet
    _assert_same_weights(loaded.unet, saved)
    assert torch.equal(_eps(_in_fresh_memory(loaded.unet)), _eps(saved))  # the config too
    assert all(not p.requires_grad for p in loaded.unet.parameters())
    assert initial_noise(loaded.unet, 2, torch.Generator(), torch.device("cpu"), num_frames=5).shape == (2, 4, 5, 8, 8)


@pytest.mark.slow
def test_load_video_from_sd_folder_plus_motion_adapter(tmp_path):
    """AnimateDiff's usual form: SD1.5 weights and a separate motion module folder."""
    models.tiny_sd(0).save_pretrained(tmp_path / "sd")
    video.tiny_motion_adapter(7).save_pretrained(tmp_path / "motion")
    assert not video.is_video_folder(tmp_path / "sd")
    with pytest.raises(ValueError, match="no motion adapter: pass motion_adapter="):
        video.load_video(tmp_path / "sd")
    loaded = video.load_video(tmp_path / "sd", motion_adapter=tmp_path / "motion")
    # frozen as load_video's: a trainable weight makes torch.matmul fold the temporal layers'
    # permuted input into one contiguous matrix (aten's should_fold), a different summation order
    want = UNetMotionModel.from_unet2d(models.tiny_sd(0).unet, video.tiny_motion_adapter(7)).requires_grad_(False)
    assert loaded.pipeline_class == "AnimateDiffPipeline"
    _assert_same_weights(loaded.unet, want)
    assert torch.equal(_eps(loaded.unet), _eps(want))  # from_unet2d copied the weights out of the file's map
    assert not torch.equal(_eps(loaded.unet), _eps(video.tiny_video_unet("animatediff")))  # the adapter counts


def test_load_video_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="motion adapter folder .*nowhere does not exist"):
        video.load_video(folders["animatediff"], motion_adapter=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="save the base model before add_lora"):
        parts = video.tiny_video("modelscope")
        lora.add_lora(parts.unet)
        parts.save_pretrained(tmp_path / "x")
    with pytest.raises(ValueError, match="num_frames=40 exceeds this motion model's motion_max_seq_length"):
        initial_noise(video.tiny_video_unet("animatediff"), 1, torch.Generator(), torch.device("cpu"), num_frames=40)


@pytest.mark.parametrize("kind", KINDS)
def test_add_lora_trains_only_lora_and_starts_as_a_no_op(kind):
    unet = video.tiny_video_unet(kind)
    base = _eps(unet)
    lora.add_lora(unet, rank=2, alpha=2, seed=0)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert any("temp_attentions" in n or "motion_modules" in n for n in names)  # the temporal layers too
    assert torch.equal(_eps(unet), base)


@pytest.mark.slow
def test_animatediff_pipeline_loads_our_lora(folders, tmp_path):
    """alpha != rank: a file that lost the LoRA scaling would fail the comparison."""
    unet = _lora_unet("animatediff", rank=2, alpha=6)
    trained, base = _eps(unet), _eps(video.tiny_video_unet("animatediff"))
    assert (trained - base).abs().max() > 1e-3
    lora.save_lora(unet, tmp_path)
    pipe = AnimateDiffPipeline.from_pretrained(folders["animatediff"], local_files_only=True)
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(_eps(pipe.unet), trained, atol=1e-5, rtol=0)
    frames = pipe("a red circle", num_frames=FRAMES, num_inference_steps=2, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, FRAMES, 8, 8) and frames.isfinite().all()


def test_text_to_video_pipeline_runs_our_lora(folders, tmp_path):
    """diffusers 0.42 gives UNet3DConditionModel no peft mixin, so TextToVideoSDPipeline.load_lora_weights
    cannot load any LoRA into it; `load_lora` on the stock pipeline's UNet does, from the same file."""
    unet = _lora_unet("modelscope", rank=2, alpha=6)
    trained = _eps(unet)
    assert (trained - _eps(video.tiny_video_unet("modelscope"))).abs().max() > 1e-3
    lora.save_lora(unet, tmp_path)
    pipe = TextToVideoSDPipeline.from_pretrained(folders["modelscope"], local_files_only=True)
    lora.load_lora(pipe.unet, tmp_path)
    torch.testing.assert_close(_eps(pipe.unet), trained, atol=1e-5, rtol=0)
    frames = pipe("a red circle", num_frames=FRAMES, num_inference_steps=2, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, FRAMES, 8, 8) and frames.isfinite().all()


# ---- finetune on video folders ------------------------------------------------------------------


TINY_RUN = dict(num_steps=3, batch_size=2, images_per_prompt=2, num_frames=FRAMES, sample_prompts=1,
                sample_seeds=(0,), tensorboard=False, lr=1e-2)


@pytest.fixture(scope="module")
def video_run(folders, tmp_path_factory):
    """Three straight steps of finetune on the tiny text-to-video folder."""
    return finetune(model=str(folders["modelscope"]), out_dir=str(tmp_path_factory.mktemp("run")), train_steps=3,
                    **TINY_RUN)


@pytest.mark.slow
def test_finetune_a_text_to_video_folder(video_run, folders, tmp_path):
    """Two steps and one more resumed give the straight run's LoRA; GIF sample grids; the LoRA runs in
    the stock TextToVideoSDPipeline."""
    from PIL import Image

    finetune(model=str(folders["modelscope"]), out_dir=str(tmp_path / "b"), train_steps=2, **TINY_RUN)
    resumed = finetune(resume=str(tmp_path / "b"), train_steps=3)
    a, b = (safetensors.torch.load_file(str(r.lora_path)) for r in (video_run, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in video_run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["reward_mean"]) for r in rows)
    assert [p.name for p in video_run.grid_paths] == ["step_000000.gif", "step_000003.gif"]
    with Image.open(video_run.grid_paths[-1]) as gif:
        assert gif.n_frames == FRAMES
    pipe = TextToVideoSDPipeline.from_pretrained(folders["modelscope"], local_files_only=True)
    base = _eps(pipe.unet)
    lora.load_lora(pipe.unet, video_run.out_dir)
    assert (_eps(pipe.unet) - base).abs().max() > 0


@pytest.mark.slow
def test_cli_samples_and_evaluates_a_video_run(video_run, tmp_path, capsys):
    from PIL import Image

    from rlr_fast.cli import main

    out = tmp_path / "samples"
    assert main(["sample", "--lora", str(video_run.out_dir), "--prompt", "a red circle on a blue background",
                 "--seeds", "0", "--steps", "2", "--frames", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.gif")) == ["grid.gif", "prompt000_seed0.gif"]
    with Image.open(out / "prompt000_seed0.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (16, 16)
    assert main(["evaluate", "--lora", str(video_run.out_dir), "--prompts", "demo", "--seeds", "0,1", "--steps", "2",
                 "--reward", "temporal_consistency", "--batch-size", "4", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for sampler in ("base", "lora"):
        stats = report["rewards"]["temporal_consistency"][sampler]
        assert stats["n"] == 2 * len(rlr_fast.presets.PROMPT_SETS["demo"]) and -1 <= stats["mean"] <= 0
    assert report["kl"]["lora"]["mean"] > 0 and report["diversity"]["pixels"]["lora"]["mean"] > 0
    assert (tmp_path / "eval" / "eval_grid.png").is_file()


@pytest.mark.slow
def test_finetune_animatediff_from_sd_and_motion_adapter(tmp_path):
    """AnimateDiff as users have it (SD weights + a motion module) with the temporal-consistency reward;
    the stock AnimateDiffPipeline, built from the same two folders, loads the LoRA."""
    models.tiny_sd(0).save_pretrained(tmp_path / "sd")
    video.tiny_motion_adapter(0).save_pretrained(tmp_path / "motion")
    run = finetune(model=str(tmp_path / "sd"), motion_adapter=str(tmp_path / "motion"), reward="temporal_consistency",
                   out_dir=str(tmp_path / "run"), train_steps=1, **TINY_RUN)
    base = _eps(video.load_video(tmp_path / "sd", motion_adapter=tmp_path / "motion").unet)
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "sd", motion_adapter=MotionAdapter.from_pretrained(
        tmp_path / "motion"), local_files_only=True)
    pipe.load_lora_weights(run.out_dir)
    lora_unet = video.load_video(tmp_path / "sd", motion_adapter=tmp_path / "motion").unet
    lora.load_lora(lora_unet, run.out_dir)
    torch.testing.assert_close(_eps(pipe.unet), _eps(lora_unet), atol=1e-5, rtol=0)
    assert (_eps(lora_unet) - base).abs().max() > 0


@pytest.mark.slow
def test_finetune_refuses_bad_video_settings(folders, tmp_path):
    with pytest.raises(ValueError, match="num_frames=20 exceeds this motion model's motion_max_seq_length"):
        finetune(model=str(folders["animatediff"]), out_dir=str(tmp_path / "a"), train_steps=1,
                 **{**TINY_RUN, "num_frames": 20})
    assert not (tmp_path / "a" / "config.yaml").exists()  # refused before the out_dir changed
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        finetune(model=str(folders["modelscope"]), out_dir=str(tmp_path / "b"), **{**TINY_RUN, "num_frames": 0})
    with pytest.raises(ValueError, match="checkpoint_unet=True, but UNet3DConditionModel has no gradient"):
        finetune(model=str(folders["modelscope"]), out_dir=str(tmp_path / "c"), train_steps=1, checkpoint_unet=True,
                 **TINY_RUN)


# ---- the memory planner on video models -----------------------------------------------------------


@pytest.mark.slow
def test_planner_covers_a_video_update(folders):
    """The planner measures the video UNet's step on 5-D latents (on meta) as a real update saves it,
    counts the frames in the stored trajectory, and never checkpoints a UNet3DConditionModel."""
    planner = importlib.import_module("rlr_fast.plan")  # rlr_fast.plan is bound to the function
    cfg = Config.from_preset("demo", model=str(folders["modelscope"]), lora_rank=2, lora_alpha=2.0, **TINY_RUN)
    p = planner.plan(cfg)
    assert p.run.frames == FRAMES and p.options["checkpoint_unet"] is False
    assert "UNet3DConditionModel has no gradient checkpointing: checkpoint_unet stays False" in p.notes
    with pytest.raises(planner.PlanError) as refused:  # nothing fits: even the smallest plan keeps it off
        planner.plan(cfg, 1e-3)
    assert refused.value.smallest.options["checkpoint_unet"] is False

    parts = video.load_video(folders["modelscope"])
    lora.add_lora(parts.unet, rank=2, alpha=2, seed=0)
    for q in lora.lora_parameters(parts.unet):  # as after the first step: gradients are resident
        q.grad = torch.zeros_like(q)
    x_T = initial_noise(parts.unet, 2, torch.Generator().manual_seed(0), torch.device("cpu"), num_frames=FRAMES)
    traj = rlr_fast.rollout(parts.unet, parts.scheduler, x_T, num_steps=3, eta=1.0,
                            encoder_hidden_states=parts.encode_prompts(["a", "b"]))
    real = rlr_fast.estimate(parts.unet, traj, _reward, method="full_bp", track_memory=True)["peak_saved_bytes"]
    planned = planner.default_table().unet_phase(
        p.run.ids["unet"], p.run.components["unet"], 2, p.run.unet_latent, autocast=False, attention="flash",
        lora_rank=2, cfg_mode="none", grad="input", checkpoint=False, saved=True)
    assert math.isclose(planned, real, rel_tol=0.01), (planned, real)
    stored = sum(t.nbytes for t in (traj.latents, traj.noises, traj.log_probs, traj.encoder_hidden_states, traj.x0))
    assert p.breakdown["trajectory"] == stored  # x_T..x_0, noises, log p, prompts and dR/dx0, frames included


def test_planner_reads_animatediff_from_sd_and_motion_adapter(tmp_path):
    planner = importlib.import_module("rlr_fast.plan")
    models.tiny_sd(0).save_pretrained(tmp_path / "sd")
    video.tiny_motion_adapter(0).save_pretrained(tmp_path / "motion")
    cfg = Config.from_preset("demo", model=str(tmp_path / "sd"), motion_adapter=str(tmp_path / "motion"), **TINY_RUN)
    run = planner.describe_run(cfg)
    unet = video.tiny_video_unet("animatediff")
    assert run.components["unet"]["_class_name"] == "UNetMotionModel" and run.unet_checkpointing
    assert run.frames == FRAMES and run.unet_latent == (FRAMES, 8, 8) and run.images == 2 * FRAMES
    meta = planner.architectures.build("unet", run.components["unet"])
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in unet.named_parameters()]
    assert planner.describe_run(cfg.with_overrides({"motion_adapter": None})).frames is None  # an image model
    with pytest.raises(ValueError, match="motion_adapter .*nowhere' is not a MotionAdapter folder"):
        planner.describe_run(cfg.with_overrides({"motion_adapter": str(tmp_path / "nowhere")}))


@pytest.mark.slow
def test_finetune_plans_a_video_run(folders, tmp_path):
    run = finetune(model=str(folders["modelscope"]), out_dir=str(tmp_path / "run"), train_steps=1, max_memory_gb=1.0,
                   lora_rank=2, lora_alpha=2.0, **TINY_RUN)
    plan_table = (run.out_dir / "memory_plan.md").read_text()
    assert f"2 samples of {FRAMES} frames of 16x16 px" in plan_table and "| checkpoint_unet | False |" in plan_table
