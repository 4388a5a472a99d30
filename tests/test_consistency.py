"""SQDF's consistency-model soft Q (rlr_fast.consistency, docs/estimator.md §11.5): a tiny LCM-LoRA in
the released key layout (kohya's `lora_unet_*` keys with `.alpha`, as latent-consistency/lcm-lora-sdv1-5
ships) on the policy's own UNet; each forward uses the adapters it should; x0_hat equals diffusers'
LCMScheduler step on the LoRA-fused UNet; the SQDF gradient equals autograd of the written objective;
the public code's rewards > 0 mask; a finetune run whose saved LoRA is the policy's alone.
"""

import copy
import importlib
import sys

import pytest
import safetensors.torch
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import rlr_fast
from rlr_fast.consistency import (ADAPTER, ConsistencyX0, consistency_adapter_only, guidance_embedding,
                                  load_consistency)
from rlr_fast.lora import add_lora, lora_disabled, lora_parameters, save_lora
from rlr_fast.options import EstimatorOptions
from rlr_fast.sqdf import StepStates, sqdf_gradient
from rlr_fast.sweep import CallCounter
from rlr_fast.testing import make_scheduler, make_unet

F64 = torch.float64
# LCMScheduler computes its coefficients (sqrt of alphas_cumprod) in float32, ours in float64
ROUNDING = dict(rtol=1e-5, atol=1e-6)
# the module kinds the released SD1.5 LCM-LoRA adapts: attention, projections, feed-forward, resnet convs
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "time_emb_proj", "conv_shortcut")


def write_lcm_lora(folder, unet, rank=4, alpha=2.0, seed=5):
    """A random LCM-LoRA for `unet` in the released file's key layout; returns the folder."""
    g, weights = torch.Generator().manual_seed(seed), {}
    for name, module in unet.named_modules():
        if not name.endswith(TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down, up = (module.in_features,), (module.out_features, rank)
        else:
            down, up = (module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        weights[f"{key}.lora_down.weight"] = 0.05 * torch.randn(rank, *down, generator=g)
        weights[f"{key}.lora_up.weight"] = 0.05 * torch.randn(*up, generator=g)
        weights[f"{key}.alpha"] = torch.tensor(alpha)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(weights, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def _policy(base):
    unet = copy.deepcopy(base)
    add_lora(unet, rank=2, alpha=2, seed=0)
    g = torch.Generator().manual_seed(3)
    for p in lora_parameters(unet):  # random B: the policy differs from the base model
        p.data = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return unet


def _fused(base, folder):
    """The base UNet with the LCM-LoRA fused into its weights, as the public code's second UNet."""
    fused = copy.deepcopy(base)
    weights, alphas = StableDiffusionPipeline.lora_state_dict(folder)
    fused.load_lora_adapter(weights, network_alphas=alphas, prefix="unet", adapter_name="lcm")
    fused.fuse_lora()
    return fused


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = make_unet().to(F64)
    folder = write_lcm_lora(tmp_path_factory.mktemp("lcm"), base)
    unet = _policy(base)
    policy_only = _policy(base)
    estimator = load_consistency(unet, folder, make_scheduler())
    return dict(base=base, folder=folder, unet=unet, policy_only=policy_only, fused=_fused(base, folder),
                estimator=estimator)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g, dtype=F64), torch.randn(batch, 3, 16, generator=g, dtype=F64))


def _out(model, x, t, cond):
    return model(x, t, encoder_hidden_states=cond).sample


def test_each_forward_uses_the_adapters_it_should(setup):
    unet, x, t = setup["unet"], *_inputs()[:1], torch.tensor([500, 300])
    cond = _inputs()[1]
    policy = _out(unet, x, t, cond)
    assert torch.equal(policy, _out(setup["policy_only"], x, t, cond))  # the policy: its LoRA alone
    with lora_disabled(unet):
        assert torch.equal(_out(unet, x, t, cond), _out(setup["base"], x, t, cond))  # the base: no adapter
        with consistency_adapter_only(unet):  # the consistency model: the LCM-LoRA alone
            consistency = _out(unet, x, t, cond)
        assert torch.equal(_out(unet, x, t, cond), _out(setup["base"], x, t, cond))  # switched back
    torch.testing.assert_close(consistency, _out(setup["fused"], x, t, cond), rtol=1e-12, atol=1e-12)
    assert torch.equal(_out(unet, x, t, cond), policy)
    assert (consistency - policy).abs().max() > 1e-3 and (policy - _out(setup["base"], x, t, cond)).abs().max() > 1e-3


def test_only_the_policy_trains_and_saves(setup, tmp_path):
    unet, policy_only = setup["unet"], setup["policy_only"]
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in policy_only.named_parameters() if p.requires_grad]
    assert trainable and not any(ADAPTER in n for n in trainable)
    with consistency_adapter_only(unet):
        pass
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == trainable
    a, b = save_lora(unet, tmp_path / "a"), save_lora(policy_only, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()  # the consistency adapter never reaches the saved LoRA


def _lcm_step(lcm, model, x, tau, cond, generator=None, timestep_cond=None):
    eps = model(x, tau, encoder_hidden_states=cond, timestep_cond=timestep_cond).sample
    return lcm.step(eps, tau, x, generator=generator)


def test_one_step_is_lcm_scheduler_on_the_fused_unet(setup):
    """The DDIM timestep of x maps to the nearest consistency timestep of LCMScheduler.set_timesteps(T)."""
    x, cond = _inputs(3)
    T, ddim_t = 10, torch.tensor([901, 501, 101])
    ours = setup["estimator"]
    with consistency_adapter_only(setup["unet"]):
        x0 = ours.x0(setup["unet"], x, ddim_t, T, cond)
    lcm = LCMScheduler.from_config(make_scheduler().config)
    lcm.set_timesteps(T)
    for b in range(3):
        tau = lcm.timesteps[(lcm.timesteps - ddim_t[b]).abs().argmin()]
        lcm._step_index = None
        lcm.set_timesteps(T)
        lcm._init_step_index(tau)
        expected = _lcm_step(lcm, setup["fused"], x[b:b + 1], tau, cond[b:b + 1]).denoised
        torch.testing.assert_close(x0[b:b + 1], expected, **ROUNDING)


def test_n_steps_are_lcm_scheduler_steps_with_its_noise(setup):
    """Three consistency steps from the nearest timestep, re-noised between them: LCMScheduler with
    those custom timesteps and the same generator."""
    x, cond = _inputs(1, seed=4)
    ours = ConsistencyX0(make_scheduler(), steps=3)
    plan = ours.plan(torch.tensor([701]), 20)
    assert plan.shape == (3, 1) and plan[0, 0] == 699 and bool((plan[1:] < plan[:-1]).all())
    with consistency_adapter_only(setup["unet"]):
        x0 = ours.walk(setup["unet"], x, plan, cond, generator=torch.Generator().manual_seed(8))
    lcm = LCMScheduler.from_config(make_scheduler().config)
    lcm.set_timesteps(timesteps=plan[:, 0].tolist())
    g, sample = torch.Generator().manual_seed(8), x
    for tau in lcm.timesteps:
        out = _lcm_step(lcm, setup["fused"], sample, tau, cond, generator=g)
        sample = out.prev_sample
    torch.testing.assert_close(x0, out.denoised, **ROUNDING)


def test_guidance_embedding_and_a_full_lcm_unet(tmp_path):
    """A full LCM UNet folder (time_cond_proj_dim: the guidance scale as an embedding) loads as a second
    UNet; x0_hat is LatentConsistencyModelPipeline's embedding and LCMScheduler's step."""
    w = torch.tensor([0.0, 3.5, 7.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=9, dtype=F64)
    # diffusers takes log(10000) in float32: angles up to 7000 rad agree to float32 rounding
    torch.testing.assert_close(guidance_embedding(w.double(), 9), expected, rtol=1e-4, atol=1e-4)
    config = {k: v for k, v in make_unet().config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    lcm_unet = UNet2DConditionModel(**{**config, "time_cond_proj_dim": 8}).to(F64).eval()
    assert lcm_unet.time_embedding.cond_proj is not None
    lcm_unet.save_pretrained(tmp_path / "lcm_unet")
    policy = _policy(make_unet().to(F64))
    estimator = load_consistency(policy, tmp_path / "lcm_unet", make_scheduler(), guidance=4.5)
    assert estimator.network is not None and ADAPTER not in policy.peft_config
    x, cond = _inputs(1)
    x0 = estimator.x0(estimator.network, x, torch.tensor([481]), 10, cond)
    lcm = LCMScheduler.from_config(make_scheduler().config)
    lcm.set_timesteps(10)
    lcm._init_step_index(torch.tensor(499))
    embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([3.5]), 8, dtype=F64)
    expected = _lcm_step(lcm, lcm_unet, x, torch.tensor(499), cond, timestep_cond=embedding).denoised
    torch.testing.assert_close(x0, expected, **ROUNDING)


# ---- the SQDF gradient through the consistency model -------------------------------------------


OFFSET = 0.0  # set by the mask test so that some soft Qs are > 0 and some not


def _reward(x0):
    flat = x0.flatten(1)
    return -(flat - 0.3).pow(2).mean(1) + flat[:, :7].sin().sum(1) + OFFSET


def _score(x0):
    x0 = x0.detach().requires_grad_()
    with torch.enable_grad():
        r = _reward(x0)
        (g,) = torch.autograd.grad(r.sum(), x0)
    return r.detach(), g


def _grads(unet):
    return torch.cat([p.grad.flatten() for p in lora_parameters(unet)])


def _states(unet, T=5, ks=(1, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, cond = torch.randn(3, 4, 8, 8, generator=g, dtype=F64), torch.randn(3, 3, 16, generator=g, dtype=F64)
    traj = rlr_fast.rollout(unet, make_scheduler(), x, num_steps=T, eta=1.0, encoder_hidden_states=cond, generator=g)
    return traj, StepStates.of(traj, torch.tensor(ks))


def _ours(unet, states, noise, **options):
    unet.zero_grad(set_to_none=True)
    out = sqdf_gradient(unet, states, noise, _score, EstimatorOptions(method="sqdf", x0_estimator="consistency",
                                                                      **options), CallCounter())
    return _grads(unet).clone(), out


def _written_loss(unet, base, fused, traj, ks, noise, alpha, gamma, mask=False):
    """mean_b -(gamma^(T-1-k) R(x0_hat) - alpha KL) [R > 0 with `mask`], one graph: diffusers' DDIM step
    for x', separate base and fused-LCM UNets, LCMScheduler's step for x0_hat (x' itself at the last step)."""
    sched, T = make_scheduler(), traj.num_steps
    sched.set_timesteps(T)
    lcm = LCMScheduler.from_config(sched.config)
    loss = 0
    for b, k in enumerate(ks):
        x, cond = traj.latents[k][b:b + 1], traj.encoder_hidden_states[b:b + 1]
        t = sched.timesteps[k]
        zero = torch.zeros_like(x)
        e_theta, e_base = _out(unet, x, t, cond), _out(base, x, t, cond)
        moved = sched.step(e_theta, t, x, eta=1.0, variance_noise=noise[b:b + 1]).prev_sample
        mean = sched.step(e_theta, t, x, eta=1.0, variance_noise=zero).prev_sample
        mean_ref = sched.step(e_base, t, x, eta=1.0, variance_noise=zero).prev_sample
        var = float(traj.sigmas[k]) ** 2
        x0 = moved
        if k < T - 1:
            lcm.set_timesteps(T)
            tau = lcm.timesteps[(lcm.timesteps - sched.timesteps[k + 1]).abs().argmin()]
            lcm._init_step_index(tau)
            x0 = _lcm_step(lcm, fused, moved, tau, cond).denoised
        r = _reward(x0)[0]
        term = gamma ** (T - 1 - k) * r - alpha * (mean - mean_ref).pow(2).sum() / (2 * var)
        loss = loss - term * (float(r > 0) if mask else 1.0) / len(ks)
    return loss


@pytest.mark.parametrize("mask", [False, True])
def test_gradient_is_autograd_of_the_written_objective(setup, mask, monkeypatch):
    unet = setup["unet"]
    traj, states = _states(unet)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    if mask:  # zero between the two lowest soft Qs: one sample dropped, two kept
        low = _ours(unet, states, noise)[1]["q"].sort().values
        monkeypatch.setattr(sys.modules[__name__], "OFFSET", -float(low[0] + low[1]) / 2)
    ours, out = _ours(unet, states, noise, sqdf_alpha=0.05, sqdf_gamma=0.8, sqdf_reward_mask=mask)
    unet.zero_grad(set_to_none=True)
    _written_loss(unet, setup["base"], setup["fused"], traj, [1, 3, 4], noise, 0.05, 0.8, mask).backward()
    exact = _grads(unet)
    assert exact.norm() > 0 and float((ours - exact).norm() / exact.norm()) < 1e-5  # float32 LCM coefficients
    if mask:  # the mask must have dropped something for this case to test it
        assert 0 < int((out["q"] > 0).sum()) < 3


def test_consistency_differs_from_tweedie_and_needs_a_model(setup):
    unet = setup["unet"]
    _, states = _states(unet)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    consistency, _ = _ours(unet, states, noise)
    unet.zero_grad(set_to_none=True)
    sqdf_gradient(unet, states, noise, _score, EstimatorOptions(method="sqdf"), CallCounter())
    assert float((consistency - _grads(unet)).norm()) > 1e-6
    with pytest.raises(ValueError, match="needs a consistency model on the UNet"):
        _ours(_policy(setup["base"]), states, noise)
    with pytest.raises(FileNotFoundError, match="consistency_model="):
        load_consistency(_policy(setup["base"]), setup["folder"] / "missing", make_scheduler())


# ---- finetune and the sqdf preset --------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_the_consistency_model_saves_the_policy_alone(tiny, tmp_path):
    from rlr_fast.models import load_sd
    from rlr_fast.train import finetune

    lcm = write_lcm_lora(tmp_path / "lcm", load_sd(tiny["model"], components=("unet",)).unet)
    run = finetune(out_dir=str(tmp_path / "run"), train_steps=2, method="sqdf", sqdf_alpha=0.01, reward="brightness",
                   x0_estimator="consistency", consistency_model=str(lcm), **tiny)
    saved = safetensors.torch.load_file(str(run.out_dir / "pytorch_lora_weights.safetensors"))
    assert saved and not any(ADAPTER in k or "lora_unet" in k for k in saved)
    assert all(k.startswith("unet.") and (".to_q." in k or ".to_k." in k or ".to_v." in k or ".to_out." in k)
               for k in saved)  # the policy's attention LoRA, not the LCM-LoRA's convolutions


def test_the_sqdf_preset_takes_the_consistency_model_with_one_key():
    from rlr_fast.config import Config

    cfg = Config.from_preset("sqdf", x0_estimator="consistency")
    assert (cfg.x0_estimator, cfg.consistency_model, cfg.consistency_steps) == ("consistency", "lcm-lora-sdv1-5", 1)
    with pytest.raises(ValueError, match="consistency_steps"):
        Config.from_preset("sqdf", x0_estimator="consistency", consistency_steps=0)


# ---- the memory planner ------------------------------------------------------------------------


def test_the_planner_counts_the_consistency_weights_and_steps(setup):
    """SD1.4 on meta: the LCM-LoRA's weights resident in the run's dtype, and a phase of N UNet steps
    with an input gradient (conditional only) for the VJP through N consistency steps."""
    P = importlib.import_module("rlr_fast.plan")  # the package, not the function rlr_fast.plan

    case = dict(model="sd14", resolution=512, batch_size=2, num_steps=50, guidance_scale=5.0, method="sqdf",
                dtype="float16")
    tweedie = P.plan("sqdf", None, **case)
    one, three = (P.plan("sqdf", None, x0_estimator="consistency", consistency_model=str(setup["folder"]),
                         consistency_steps=n, **case) for n in (1, 3))
    weights = safetensors.torch.load_file(str(setup["folder"] / "pytorch_lora_weights.safetensors"))
    assert one.breakdown["consistency_weights"] == 2 * sum(t.numel() for t in weights.values())
    assert "consistency_x0" not in tweedie.phases and "consistency_weights" not in tweedie.breakdown
    assert three.phases["consistency_x0"] == 3 * one.phases["consistency_x0"] > 0
    assert three.peak_bytes >= one.peak_bytes >= tweedie.peak_bytes
    missing = P.plan("sqdf", None, x0_estimator="consistency", consistency_model="no/such/folder", **case)
    assert missing.breakdown["consistency_weights"] == 0 and any("not found here" in n for n in missing.notes)


@pytest.mark.slow
def test_the_planned_phase_covers_the_measured_consistency_vjp(setup):
    """On the tiny UNet: the planner's consistency_x0 phase (N x one conditional UNet step with an
    input gradient, measured on meta) is at least the live peak of the real VJP through N = 2
    consistency steps with the adapter (CPU, float32), which one step's phase is not."""
    from rlr_fast.plan.table import MeasurementTable
    from rlr_fast.plan.architectures import architecture_id

    P = importlib.import_module("rlr_fast.plan")
    unet = copy.deepcopy(setup["unet"]).float()
    estimator = ConsistencyX0(make_scheduler(), steps=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    cond, cot = torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, 8, 8, generator=g)

    def run():
        with consistency_adapter_only(unet):
            x0 = estimator.x0(unet, x, torch.tensor([601, 601]), 10, cond, generator=torch.Generator().manual_seed(1))
        torch.autograd.grad(x0, x, cot)

    real = P.measure(run, existing=list(unet.parameters()) + list(unet.buffers()) + [x, cond, cot])
    config = dict(make_unet().config)
    one_step = MeasurementTable(None).unet_phase(architecture_id("unet", config), config, 2, (8, 8), autocast=False,
                                                 attention="flash", lora_rank=2, cfg_mode="none", grad="input",
                                                 checkpoint=False)
    # one step alone would not cover it (measured 2.44 MB against 1.40 MB per step, 2026-12-07)
    assert one_step < real.peak_bytes <= 2 * one_step
