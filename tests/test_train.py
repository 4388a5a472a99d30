"""finetune on a tiny offline SD: outputs, bit-exact resume, Ctrl-C, non-finite updates, bad input."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from rlr_fast.config import Config
from rlr_fast.train import NonFiniteError, _resolve_config, finetune


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """Overrides for a run of a few seconds: T = 3, one prompt x 2 images per step."""
    return dict(model=str(tiny_folder), num_steps=3, batch_size=2, images_per_prompt=2, sample_prompts=1,
                sample_seeds=(0,), tensorboard=False, warmup_steps=1, lr=1e-2)


def lora_tensors(out_dir):
    return safetensors.torch.load_file(str(out_dir / "pytorch_lora_weights.safetensors"))


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """4 steps without interruption."""
    out = tmp_path_factory.mktemp("straight")
    return finetune(out_dir=str(out), train_steps=4, sample_every=2, checkpoint_every=2, **tiny)


def test_outputs_and_metrics(straight):
    out = straight.out_dir
    for path in (straight.lora_path, straight.config_path, straight.metrics_path, straight.curve_path,
                 straight.checkpoint_path, out / "summary.json", *straight.grid_paths):
        assert path.is_file(), path
    assert [p.name for p in straight.grid_paths] == ["step_000000.png", "step_000002.png", "step_000004.png"]
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert np.isfinite(r["reward_mean"]) and r["reward_std"] >= 0 and r["grad_norm"] > 0
        assert r["skipped"] is False and r["seconds"] > 0 and r["peak_memory_bytes"] > 0
        est = r["estimator"]
        assert est["F"] == [1] and est["H"] == [2, 3] and est["j"] == 1  # T = 3, f = 1, h = 2
        assert est["unet_forward"] > 0 and set(est["term_norms"]) >= {"first_order", "half_order"}
    assert [r["lr"] for r in rows] == [1e-2] * 4  # warm-up of one step reaches lr at step 1
    assert Config.from_dict(__import__("yaml").safe_load(straight.config_path.read_text())).train_steps == 4
    assert straight.metrics["steps"] == 4 and straight.metrics["last"]["step"] == 4


def test_lora_changes_the_unet_and_loads_in_a_stock_pipeline(straight, tiny_folder):
    from diffusers import StableDiffusionPipeline

    assert any(t.abs().max() > 0 for name, t in lora_tensors(straight.out_dir).items() if "lora.up" in name)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, requires_safety_checker=False)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, t, cond).sample
        pipe.load_lora_weights(straight.out_dir)
        tuned = pipe.unet(x, t, cond).sample
    assert (tuned - base).abs().max() > 1e-6


def test_kill_then_resume_is_bit_exact(straight, tiny, tmp_path):
    def kill_at_3(step, record):
        if step == 3:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, checkpoint_every=2, callback=kill_at_3, **tiny)
    assert len(records(tmp_path)) == 3  # step 3 was logged, but the last checkpoint is step 2
    result = finetune(resume=str(tmp_path))
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in records(tmp_path)] == [r["reward_mean"] for r in records(straight.out_dir)]
    a, b = lora_tensors(straight.out_dir), lora_tensors(result.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_keeps_a_checkpoint_and_resume_is_bit_exact(straight, tiny, tmp_path, capsys):
    def interrupt_at_1(step, record):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, checkpoint_every=2, callback=interrupt_at_1,
                 **tiny)
    assert (tmp_path / "checkpoints" / "step_000001.safetensors").is_file()
    assert f"--resume {tmp_path}" in capsys.readouterr().err
    result = finetune(resume=str(tmp_path))
    a, b = lora_tensors(straight.out_dir), lora_tensors(result.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_is_refused(straight):
    with pytest.raises(ValueError, match=r"cannot resume .*lr: checkpoint 0.01, now 0.02"):
        finetune(resume=str(straight.out_dir), lr=2e-2)
    other = _resolve_config(None, {"resume": str(straight.out_dir), "train_steps": 9})
    assert other.train_steps == 9 and other.lr == 1e-2  # the checkpoint's config, extended


def test_resume_from_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no step_.*checkpoint"):
        finetune(resume=str(tmp_path))


def test_nonfinite_reward_skips_the_update_and_is_counted(tiny, tmp_path):
    calls = []

    def nan_on_first_call(images, prompts):
        calls.append(1)
        value = -((images - 0.5) ** 2).mean((1, 2, 3))
        return value * float("nan") if len(calls) == 1 else value

    result = finetune(out_dir=str(tmp_path), train_steps=2, reward=nan_on_first_call, **tiny)
    rows = records(tmp_path)
    assert rows[0]["skipped"] == "reward" and rows[0]["reward_mean"] is None and rows[0]["grad_norm"] is None
    assert rows[1]["skipped"] is False and rows[1]["nonfinite_in_a_row"] == 0
    assert result.metrics["nonfinite_skipped"] == 1


def test_nonfinite_gradients_stop_the_run_after_max_nonfinite(tiny, tmp_path):
    def infinite_slope(images, prompts):  # value 0, d sqrt(x)/dx = inf at 0
        return (images.mean((1, 2, 3)) * 0).sqrt()

    with pytest.raises(NonFiniteError, match=r"stopped at step 2: 2 updates in a row .*non-finite gradient"):
        finetune(out_dir=str(tmp_path), train_steps=5, max_nonfinite=2, reward=infinite_slope, **tiny)
    rows = records(tmp_path)
    assert [r["skipped"] for r in rows] == ["gradient", "gradient"]


def test_reward_of_wrong_shape(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        finetune(out_dir=str(tmp_path), train_steps=1, reward=lambda images, prompts: images.mean((2, 3)), **tiny)


def test_non_differentiable_reward_with_a_first_order_method(tiny, tmp_path):
    with pytest.raises(ValueError, match="not differentiable.*first_order_steps=1"):
        finetune(out_dir=str(tmp_path), reward="jpeg_compressibility", **tiny)


def test_unknown_reward_name(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'colour_match'.*color_match"):
        finetune(out_dir=str(tmp_path), reward="colour_match", **tiny)


def test_missing_reward_weights(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/clip"):
        finetune(out_dir=str(tmp_path), reward="aesthetic", **tiny,
                 reward_kwargs={"clip_path": str(tmp_path / "nowhere/clip"), "head_path": str(tmp_path / "h.pth")})


def test_missing_model_folder(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model does not exist"):
        finetune(out_dir=str(tmp_path / "out"), **{**tiny, "model": str(tmp_path / "no_such_model")})


def test_folder_that_is_not_a_diffusers_layout(tiny, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a diffusers Stable Diffusion folder"):
        finetune(out_dir=str(tmp_path / "out"), **{**tiny, "model": str(tmp_path / "model")})


def test_empty_prompt_file(tiny, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n# none\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        finetune(out_dir=str(tmp_path / "out"), prompts=str(tmp_path / "prompts.txt"), **tiny)


def test_output_path_that_is_a_file(tiny, tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="taken is an existing file"):
        finetune(out_dir=str(tmp_path / "taken"), **tiny)


def test_output_dir_with_an_earlier_run(straight, tiny):
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        finetune(out_dir=str(straight.out_dir), overwrite=False, **tiny)
    assert Config.from_preset("demo").overwrite  # a demo run replaces the previous demo


def test_gpu_preset_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' \(preset 'sd14'\) needs a CUDA GPU.*--preset demo"):
        finetune("sd14", out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # failed before touching anything


def test_no_arguments_means_the_demo_preset():
    assert _resolve_config(None, {}) == Config.from_preset("demo")


def test_memory_budget_and_profiling(tiny, tmp_path, monkeypatch):
    """max_memory_gb applies the planner's options; profile=True puts NVTX ranges around the phases."""
    import importlib

    import yaml

    import rlr_fast.profiling as profiling

    planner = importlib.import_module("rlr_fast.plan")  # the module (rlr_fast.plan is also the function)

    asked = {}

    class FakePlan:
        options = {"max_batch": 2, "checkpoint_unet": True, "checkpoint_vae": False, "decode_chunk": 2,
                   "split_cfg": False, "free_text_encoder": True}

        def config_overrides(self):
            return self.options

        def table(self):
            return "| option | value |"

    def fake_plan(cfg):
        asked.update(budget=cfg.max_memory_gb, model=cfg.model)
        return FakePlan()

    ranges = []
    monkeypatch.setattr(planner, "plan", fake_plan)
    monkeypatch.setattr(profiling, "find_backend", lambda: profiling.NvtxBackend("fake", ranges.append, lambda: None))
    try:
        result = finetune(out_dir=str(tmp_path), train_steps=1, max_memory_gb=3.0, profile=True, **tiny)
    finally:
        profiling.enable_profiling(False)
    saved = yaml.safe_load(result.config_path.read_text())
    assert {k: saved[k] for k in FakePlan.options} == FakePlan.options
    assert asked["budget"] == 3.0 and asked["model"] == tiny["model"]
    assert (tmp_path / "memory_plan.md").read_text() == "| option | value |"
    assert {"rollout", "estimate", "reward", "optimizer step", "sample grid"} <= set(ranges)


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    """With tensorboard importable, every numeric metric also goes to a SummaryWriter."""
    import sys
    import types

    from rlr_fast.train import MetricsLog

    written = []

    class FakeWriter:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path, keep_until=None, tensorboard=True)
    log.write({"step": 3, "reward_mean": 0.5, "skipped": False, "estimator": {"j": 1}})
    log.close()
    assert written == [("dir", str(tmp_path / "tensorboard")), ("reward_mean", 0.5, 3), ("closed",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward_mean"] == 0.5
