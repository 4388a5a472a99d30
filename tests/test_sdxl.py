"""SDXL through the model-family adapter, on a tiny random SDXL-shaped folder the tests build: loading,
the rollout against diffusers' StableDiffusionXLPipeline, the LoRA the pipeline reads, every estimator,
the CUDA-graph step, prompt schedules, unbiasedness on a toy driven through the same adapter, and a
resumed run."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import rlr_fast
from rlr_fast.cuda_graph import GraphedRollout
from rlr_fast.families import ANIMATEDIFF, MODELSCOPE, OTHER, SD, SDXL, family_of
from rlr_fast.lora import add_lora, lora_parameters, save_lora
from rlr_fast.models import load_sd
from rlr_fast.samplers import DDIMSampler
from rlr_fast.sdxl import SDXLModels, tiny_sdxl
from rlr_fast.testing import (TOY_SCHEDULE, ConditionedLinearEps, exact_loss_gradient, make_scheduler, make_unet,
                              quadratic_reward)
from plan_checks import assert_plan_matches_update, planner
from runs import assert_same_run, killed_and_resumed, rewards_and_lora

T, B = 4, 2
PROMPTS = ["a red cat", "a blue dog"]


# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, as it ships
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """tiny_sdxl saved as a diffusers folder, with SDXL 1.0's own (Euler) scheduler config."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl(seed=0).save_pretrained(path)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    return path


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return load_sd(sdxl_folder)


def _pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noises(shape, seed=3):
    """Each step's noise drawn as DDIMScheduler.step draws it from the pipeline's generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=g) for _ in range(T)])


def _rollout(models, x_T, eta, guidance, **kw):
    cfg = dict(negative_encoder_hidden_states=models.encode_prompts([""] * B), guidance_scale=guidance) \
        if guidance != 1.0 else {}
    return rlr_fast.rollout(models.unet, models.scheduler, x_T, num_steps=T, eta=eta, noises=_noises(x_T.shape),
                            encoder_hidden_states=models.encode_prompts(PROMPTS), **cfg, **kw)


def test_family_of_each_network():
    from rlr_fast.video import tiny_video_unet

    assert family_of(tiny_sdxl().unet) is SDXL and family_of(make_unet()) is SD
    assert family_of(tiny_video_unet("modelscope")) is MODELSCOPE and family_of(tiny_video_unet("animatediff")) is ANIMATEDIFF
    assert family_of(torch.nn.Linear(2, 2)) is OTHER


def test_loads_as_sdxl_with_the_vae_in_float32_unless_it_is_the_fp16_fix(sdxl_folder, tmp_path):
    from diffusers import DDIMScheduler

    models = load_sd(sdxl_folder, dtype=torch.bfloat16)
    assert isinstance(models, SDXLModels) and isinstance(models.scheduler, DDIMScheduler)
    schedule = DDIMSampler(models.scheduler).schedule(10, 1.0)  # SDXL's Euler config, as DDIM
    assert models.scheduler.config.set_alpha_to_one is False
    assert schedule.equal(DDIMSampler(tiny_sdxl().scheduler).schedule(10, 1.0))
    assert models.unet.dtype == models.text_encoder_2.dtype == torch.bfloat16 and models.vae.dtype == torch.float32
    fixed = tmp_path / "fp16_fix"
    shutil.copytree(sdxl_folder, fixed)
    config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert load_sd(fixed, dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    shutil.rmtree(fixed / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="component 'text_encoder_2' is missing"):
        load_sd(fixed)


@pytest.mark.parametrize("eta, guidance, resolution", [(0.0, 5.0, None), (1.0, 5.0, None), (1.0, 1.0, None),
                                                      (1.0, 5.0, (24, 32))])
@pytest.mark.slow
def test_rollout_equals_the_diffusers_sdxl_pipeline(sdxl_folder, eta, guidance, resolution):
    """Both encoders, the pooled embedding, time ids (at the pipeline's default and at another size),
    the zero negative prompt and guidance on every added condition: to 1e-5 in float32."""
    models, pipe = load_sd(sdxl_folder), _pipeline(sdxl_folder)
    latent_hw = models.set_resolution(resolution)
    x_T = torch.randn(B, 4, *latent_hw, generator=torch.Generator().manual_seed(0))
    size = {} if resolution is None else dict(height=resolution[0], width=resolution[1])
    want = pipe(prompt=PROMPTS, num_inference_steps=T, guidance_scale=guidance, eta=eta, latents=x_T.clone(),
                generator=torch.Generator().manual_seed(3), output_type="latent", **size).images
    got = _rollout(models, x_T, eta, guidance).x0
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_conditioning_without_the_added_conditions_is_refused(sdxl):
    with pytest.raises(ValueError, match=r"packed after the tokens.*got shape \(2, 77, 32\)"):
        rlr_fast.rollout(sdxl.unet, sdxl.scheduler, torch.zeros(B, 4, 8, 8), num_steps=2, eta=1.0,
                         encoder_hidden_states=torch.randn(B, 77, 32))
    tokens, pooled, time_ids = torch.randn(B, 3, 32), torch.randn(B, 24), torch.randn(B, 6)
    assert all(torch.equal(a, b) for a, b in zip(SDXL.unpack(sdxl.unet, SDXL.pack(tokens, pooled, time_ids)),
                                                 (tokens, pooled, time_ids)))


@pytest.mark.slow
def test_the_planner_measures_sdxls_step_and_stored_chain_as_a_real_update_has_them(sdxl_folder):
    """The memory planner builds the folder's UNet on meta and conditions it as the SDXL family packs
    prompts (77 tokens + the pooled embedding and time ids): its estimate of a pathwise step's bytes
    saved for backward, with guidance, is within 1% of a real CPU update's, and the stored chain's
    bytes are the real trajectory's."""
    from rlr_fast.config import Config

    cfg = Config.from_preset("demo", model=str(sdxl_folder), num_steps=T, batch_size=B, images_per_prompt=2,
                             guidance_scale=5.0, negative_prompt="", lora_rank=2, lora_alpha=2.0)
    p = planner.plan(cfg)
    assert p.run.family is SDXL and "architecture" not in " ".join(p.notes)  # the folder's, not a fallback

    models = load_sd(sdxl_folder)
    add_lora(models.unet, rank=2, alpha=2, seed=0)
    traj = _rollout(models, torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 1.0, 5.0)
    assert_plan_matches_update(p, models, traj, B)


@pytest.mark.parametrize("budget", [None, 1e-3])
@pytest.mark.slow
def test_a_planned_sdxl_update_peaks_where_the_planner_says(sdxl_folder, budget):
    """One whole RLR update (rollout stored; pathwise and likelihood-ratio steps, the checkpointed or
    plain decode) on real CPU tensors, with the options the planner picks: the fastest (no budget) and
    the most frugal (the smallest plan of a budget nothing fits). Its live peak above the resident
    tensors is within 5% of the planner's largest phase (observed 2026-12-07: 2.1% and 0.3%)."""
    import importlib

    from rlr_fast.config import Config
    from rlr_fast.rewards.latent import LatentReward
    from rlr_fast.sweep import resident_tensors

    planner = importlib.import_module("rlr_fast.plan")
    cfg = Config.from_preset("demo", model=str(sdxl_folder), num_steps=T, batch_size=B, images_per_prompt=2,
                             guidance_scale=5.0, negative_prompt="", lora_rank=2, lora_alpha=2.0, method="rlr",
                             first_order_steps=1, h=1, baseline="none", reward="brightness")
    try:
        p = planner.plan(cfg, budget)
    except planner.PlanError as refused:
        p = refused.smallest
    frugal = budget is not None
    assert p.options["checkpoint_unet"] == p.options["split_cfg"] == frugal  # the two plans differ

    models = load_sd(sdxl_folder)
    add_lora(models.unet, rank=2, alpha=2, seed=0)
    for q in lora_parameters(models.unet):
        q.grad = torch.zeros_like(q)
    traj = _rollout(models, torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 1.0, 5.0)
    reward_fn = LatentReward(models.vae, "brightness", PROMPTS, decode_chunk=p.options["decode_chunk"],
                             checkpoint_vae=p.options["checkpoint_vae"])
    resident = (resident_tensors(models.unet, traj) + [q.grad for q in lora_parameters(models.unet)]
                + list(models.vae.parameters()) + list(models.vae.buffers()) + [traj.log_probs, traj.x0])
    real = planner.measure(lambda: rlr_fast.estimate(models.unet, traj, reward_fn, p.estimator_options(),
                                                     generator=torch.Generator().manual_seed(1)), existing=resident)
    assert math.isclose(real.peak_bytes, max(p.phases.values()), rel_tol=0.05), (real.peak_bytes, p.phases)


def test_the_planner_gives_the_vae_the_precision_load_sdxl_gives_it(sdxl_folder, tmp_path):
    """SDXL's own VAE (force_upcast) is planned in float32 in a float16 run, as load_sdxl loads it, and
    an fp16-fix VAE in float16."""
    import importlib

    from rlr_fast.config import Config

    planner = importlib.import_module("rlr_fast.plan")
    fixed = tmp_path / "fp16_fix"
    shutil.copytree(sdxl_folder, fixed)
    config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    for folder, want in ((sdxl_folder, torch.float32), (fixed, torch.float16)):
        cfg = Config.from_preset("sdxl", model=str(folder), resolution=None)
        assert planner.describe_run(cfg).vae_dtype == want
        assert load_sd(folder, dtype=torch.float16, components=("vae",)).vae.dtype == want


def _lora_unet(unet, seed=3):
    """`unet` with rank-2 LoRA whose weights are all random (peft zeroes lora_B)."""
    add_lora(unet, rank=2, alpha=2)
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(unet):
        p.data = 0.2 * torch.randn(p.shape, generator=g)
    return unet


def test_lora_is_read_by_the_sdxl_pipeline_and_changes_its_output(sdxl_folder, tmp_path):
    models, pipe = load_sd(sdxl_folder), _pipeline(sdxl_folder)
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=PROMPTS, num_inference_steps=T, guidance_scale=5.0, eta=0.0, output_type="latent")
    base = pipe(latents=x_T.clone(), **kw).images
    save_lora(_lora_unet(models.unet), tmp_path)
    metadata = safetensors.safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt").metadata()
    assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == 2
    pipe.load_lora_weights(tmp_path)
    tuned = pipe(latents=x_T.clone(), **kw).images
    assert float((tuned - base).abs().max()) > 1e-3
    ours = _rollout(models, x_T, 0.0, 5.0).x0
    assert float((ours - tuned).abs().max() / tuned.abs().max()) < 1e-5


@pytest.fixture(scope="module")
def lora_sdxl(sdxl_folder):
    models = load_sd(sdxl_folder)
    _lora_unet(models.unet)
    return models


METHODS = [dict(method="rlr", h=2), dict(method="rlr", h=2, split_cfg=True, max_batch=4),
           dict(method="rlr", h=2, baseline="value"), dict(method="full_bp"), dict(method="zo", baseline="loo"),
           dict(method="truncated_bp", truncated_bp_k=2), dict(method="sqdf"), dict(method="sqdf", split_cfg=True),
           dict(method="ddpo", advantages=torch.tensor([1.0, -1.0], dtype=torch.float64))]


@pytest.mark.parametrize("options", METHODS, ids=lambda o: "-".join(str(v) for v in o.values() if not torch.is_tensor(v)))
@pytest.mark.slow
def test_every_estimator_gives_a_finite_gradient_on_sdxl(lora_sdxl, options):
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    traj = _rollout(lora_sdxl, x_T, 1.0, 5.0, store_x0_hat=True)
    lora_sdxl.unet.zero_grad(set_to_none=True)
    extra = dict(value_state=rlr_fast.ValueStatistics()) if options.get("baseline") == "value" else {}
    rlr_fast.estimate(lora_sdxl.unet, traj, lambda x0: -x0.pow(2).flatten(1).mean(1), **options, **extra,
                      generator=torch.Generator().manual_seed(0))
    grad = torch.cat([p.grad.flatten() for p in lora_parameters(lora_sdxl.unet)])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_static_graph_step_and_prompt_schedules_carry_the_added_conditions(sdxl):
    """The CUDA-graph step (run eagerly on its static buffers) equals the rollout bit for bit, and a
    prompt schedule that switches prompts between steps equals the chain run step by step."""
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    embeddings = sdxl.encode_prompts(PROMPTS + ["a green bird"])
    negative = sdxl.encode_prompts([""] * B)
    index = torch.tensor([[0, 1], [0, 1], [2, 2], [1, 0]])
    kw = dict(num_steps=T, eta=1.0, encoder_hidden_states=embeddings, prompt_index=index,
              negative_encoder_hidden_states=negative, guidance_scale=4.0)
    traj = rlr_fast.rollout(sdxl.unet, sdxl.scheduler, x_T, noises=_noises(x_T.shape), **kw)
    static = GraphedRollout(sdxl.unet, sdxl.scheduler, capture=False)(x_T, noises=_noises(x_T.shape), **kw)
    assert torch.equal(static.latents, traj.latents)
    for k in range(T):  # each step with the conditioning written out, through the SDXL adapter
        x, t = traj.latents[k], traj.timesteps[k]
        e_u = SDXL.call(sdxl.unet, x, t, negative).sample
        e_c = SDXL.call(sdxl.unet, x, t, embeddings[index[k]]).sample
        mean = traj.c_x[k] * x + traj.c_e[k] * (e_u + 4.0 * (e_c - e_u))
        torch.testing.assert_close((mean + traj.sigmas[k] * traj.noises[k]).float(), traj.latents[k + 1],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rlr_fast.recompute_step(sdxl.unet, traj, k).detach(), mean.float(),
                                   rtol=1e-5, atol=1e-5)


# ---- unbiasedness on a linear-Gaussian toy called through the SDXL adapter ---------------------------------
# Power, by breaking the unpacking on purpose (the pooled embedding read one slot late): max |z| = 13000 for
# full_bp; the likelihood-ratio estimators' noise hides it (n = 600), and the exact tests above catch it.


class TextTimeLinearEps(ConditionedLinearEps):
    """ConditionedLinearEps on image-shaped latents (B, 3, 1, 1) whose c reaches it as SDXL's added
    conditions: c = text_embeds * time_ids[:, 0] / 16 (B, 3). Its config says text_time, so the SDXL
    adapter unpacks its conditioning at every call (rollout and each recomputation); a misread packing
    changes the gradient."""

    def __init__(self, alphas_cumprod):
        super().__init__(alphas_cumprod, 3)
        self.config = SimpleNamespace(addition_embed_type="text_time", addition_time_embed_dim=1,
                                      projection_class_embeddings_input_dim=6 + 3)

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None):
        c = added_cond_kwargs["text_embeds"] * added_cond_kwargs["time_ids"][:, :1] / 16
        return super().forward(sample.flatten(1), timestep, c[:, None, :]).reshape(sample.shape)


def _toy_prompts(steps, copies=2):
    """Three prompts (text_embeds, first time id): sample plans switch between them per step."""
    pooled = torch.tensor([[2.0, -1.0, 0.6], [-1.6, 1.2, 0.4], [0.2, 1.8, -2.0]], dtype=torch.float64)
    first_id = torch.tensor([16.0, 32.0, 8.0], dtype=torch.float64)
    time_ids = torch.cat([first_id[:, None], torch.full((3, 5), 7.0, dtype=torch.float64)], 1)
    tokens = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    packed = SDXL.pack(tokens, pooled, time_ids)  # width 4: 3 + 6 values in 3 extra rows
    plan = [[k % 2 for k in range(steps)], [(k // 2) % 3 for k in range(steps)]] * copies
    cond = torch.stack([(pooled * first_id[:, None] / 16)[p] for p in plan], 1)  # (T, B, 3), the closed form's
    return packed, torch.tensor(plan).T, cond


@pytest.mark.slow
@pytest.mark.parametrize("method, opts", [("full_bp", {}), ("rlr", dict(h=2, baseline="loo")),
                                          ("zo", dict(baseline="loo"))], ids=["full_bp", "rlr-h2", "zo"])
def test_estimators_are_unbiased_through_the_sdxl_adapter(method, opts, n=600, steps=6):
    sched = make_scheduler(**TOY_SCHEDULE)
    model = TextTimeLinearEps(sched.alphas_cumprod)
    packed, index, cond = _toy_prompts(steps)
    target = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    exact = exact_loss_gradient(model, sched, steps, 1.0, target, cond)
    g = torch.Generator().manual_seed(0)
    est = torch.empty(n, exact.numel(), dtype=torch.float64)
    for i in range(n):
        x_T = torch.randn(index.shape[1], 3, 1, 1, generator=g, dtype=torch.float64)
        traj = rlr_fast.rollout(model, sched, x_T, num_steps=steps, eta=1.0, encoder_hidden_states=packed,
                                prompt_index=index, generator=g)
        model.zero_grad(set_to_none=True)
        rlr_fast.estimate(model, traj, quadratic_reward(target.reshape(3, 1, 1)), method=method, generator=g, **opts)
        est[i] = torch.cat([p.grad.flatten() for p in model.parameters()])
    z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(n))
    assert float(z.abs().max()) < 4.0, z


# ---- a run on SDXL -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdxl_finetune_resumes_bit_exactly(sdxl_folder, tmp_path):
    """Killed after its step-2 checkpoint and resumed, a run equals one of 4 steps straight: rewards and LoRA
    bit for bit (guidance, a non-native resolution, the text encoders freed); the LoRA loads into
    StableDiffusionXLPipeline."""
    from rlr_fast.train import finetune

    kw = dict(model=str(sdxl_folder), num_steps=3, batch_size=2, images_per_prompt=2, sample_prompts=1,
              sample_seeds=(0,), tensorboard=False, warmup_steps=1, lr=1e-2, guidance_scale=3.0, resolution=24,
              train_steps=4, sample_every=2, checkpoint_every=2, free_text_encoder=True)
    straight = finetune(out_dir=str(tmp_path / "straight"), **kw)
    assert_same_run(straight, killed_and_resumed(tmp_path / "resumed", **kw), steps=4)
    assert any(float(t.abs().max()) > 0 for name, t in rewards_and_lora(straight)[1].items() if "lora.up" in name)
    _pipeline(sdxl_folder).load_lora_weights(straight.out_dir)
