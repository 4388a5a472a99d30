"""finetune on a tiny offline SD: outputs, bit-exact resume (after kills, signals, damaged files),
non-finite updates, bad input, and an out_dir that never loses a run."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import safetensors.torch
import torch

from rlr_fast.checkpoint import find_checkpoint
from rlr_fast.config import Config
from rlr_fast.run_dir import RunLock
from rlr_fast.run_setup import resolve_config
from rlr_fast.train import NonFiniteError, StopRequested, StopSignals, finetune
from runs import killed_and_resumed


def lora_tensors(out_dir):
    return safetensors.torch.load_file(str(out_dir / "pytorch_lora_weights.safetensors"))


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def copy_of(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_lora(a, b):
    a, b = lora_tensors(a), lora_tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """4 steps without interruption."""
    out = tmp_path_factory.mktemp("straight")
    return finetune(out_dir=str(out), train_steps=4, sample_every=2, checkpoint_every=2, **tiny)


@pytest.mark.slow
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


@pytest.mark.slow
def test_kill_then_resume_is_bit_exact(straight, tiny, tmp_path, capsys):
    """Killed at step 3 in the middle of writes: a torn metrics line and temporary files are left."""
    def kill_at_3(step, record):
        if step == 3:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, checkpoint_every=2, callback=kill_at_3, **tiny)
    assert len(records(tmp_path)) == 3  # step 3 was logged, but the last checkpoint is step 2
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward_me')
    leftovers = [tmp_path / "checkpoints" / ".step_000004.safetensors.0a1b2c3d.tmp",
                 tmp_path / ".summary.json.a8b7c6d5.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    result = finetune(resume=str(tmp_path))
    err = capsys.readouterr().err
    assert "dropped the torn last line" in err and "removed 2 temporary file(s)" in err
    assert not any(path.exists() for path in leftovers)
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in records(tmp_path)] == [r["reward_mean"] for r in records(straight.out_dir)]
    assert same_lora(straight.out_dir, result.out_dir)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_is_bit_exact(straight, tiny, tmp_path, capsys):
    def terminate_at_1(step, record):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def default_action(signum, frame):  # what SIGTERM did before: end the process without a checkpoint
        pytest.fail("SIGTERM reached the process's own handler")

    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        with pytest.raises(StopRequested) as stop:
            finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, checkpoint_every=2,
                     callback=terminate_at_1, **tiny)
        assert signal.getsignal(signal.SIGTERM) is default_action  # the run's handler is gone with the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.signum == signal.SIGTERM
    assert (tmp_path / "checkpoints" / "step_000001.safetensors").is_file()
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 1/4" in err and f"--resume {tmp_path}" in err
    result = finetune(resume=str(tmp_path))
    assert same_lora(straight.out_dir, result.out_dir)


def test_a_signal_during_a_commit_waits_for_its_end():
    committed = []
    with StopSignals() as stops:
        with pytest.raises(StopRequested):
            with stops.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                committed.append("rest of the update")
        with pytest.raises(StopRequested):  # outside a commit it stops at once
            os.kill(os.getpid(), signal.SIGINT)
            committed.append("never")
    assert committed == ["rest of the update"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_value_baseline_trains_and_its_running_fit_resumes_bit_exactly(tiny, tmp_path):
    """--set baseline=value: every update scores x0_hat of its likelihood-ratio steps, and the running
    fit's statistics travel in the checkpoint, so a run killed at step 3 resumes into the straight run."""
    value = dict(tiny, method="zo", baseline="value", train_steps=4, checkpoint_every=2, sample_every=0)
    straight = finetune(out_dir=str(tmp_path / "straight"), **value)
    for r in records(straight.out_dir):
        steps = len(r["estimator"]["C"])
        assert steps > 0 and r["estimator"]["reward_forward"] == 1 + steps and r["skipped"] is False
    saved, _ = find_checkpoint(straight.out_dir / "checkpoints" / "step_000002.safetensors").method_state()
    assert set(saved) == {"count", "mean_q", "mean_r", "ss_q", "ss_qr"} and saved["count"].max() > 0

    resumed = killed_and_resumed(tmp_path / "killed", **value)
    assert [r["reward_mean"] for r in records(resumed.out_dir)] == [r["reward_mean"] for r in records(straight.out_dir)]
    assert same_lora(straight.out_dir, resumed.out_dir)


def test_resume_with_another_config_is_refused(straight):
    with pytest.raises(ValueError, match=r"cannot resume .*lr: checkpoint 0.01, now 0.02"):
        finetune(resume=str(straight.out_dir), lr=2e-2)
    other, checkpoint = resolve_config(None, {"resume": str(straight.out_dir), "train_steps": 9})
    assert checkpoint.step == 4
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


@pytest.mark.slow
def test_nonfinite_gradients_stop_the_run_after_max_nonfinite(tiny, tmp_path):
    def infinite_slope(images, prompts):  # value 0, d sqrt(x)/dx = inf at 0
        return (images.mean((1, 2, 3)) * 0).sqrt()

    with pytest.raises(NonFiniteError, match=r"stopped at step 2: 2 updates in a row .*non-finite gradient.*The "
                                             r"LoRA of the last applied update and a checkpoint are in"):
        finetune(out_dir=str(tmp_path), train_steps=5, max_nonfinite=2, reward=infinite_slope, **tiny)
    rows = records(tmp_path)
    assert [r["skipped"] for r in rows] == ["gradient", "gradient"]
    # nothing was applied, so the last good LoRA is the initial one; it, a checkpoint and the summary are kept
    assert all(not t.any() for name, t in lora_tensors(tmp_path).items() if "lora.up" in name)
    assert (tmp_path / "checkpoints" / "step_000002.safetensors").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_skipped"] == 2


def test_reward_of_wrong_shape(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        finetune(out_dir=str(tmp_path), train_steps=1, reward=lambda images, prompts: images.mean((2, 3)), **tiny)


def test_non_differentiable_reward_with_a_first_order_method(tiny, tmp_path):
    with pytest.raises(ValueError, match="not differentiable.*first_order_steps=1"):
        finetune(out_dir=str(tmp_path), reward="jpeg_compressibility", **tiny)


def test_unknown_reward_name(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'colour_match'.*color_match"):
        finetune(out_dir=str(tmp_path), reward="colour_match", **tiny)


def nowhere(tmp_path):
    return {"clip_path": str(tmp_path / "nowhere/clip"), "head_path": str(tmp_path / "nowhere/head.pth")}


def test_missing_reward_weights_leave_no_out_dir(tiny, tmp_path):
    """The weights are found missing after the out_dir was locked: the failed start removes it again."""
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere/clip"):
        finetune(out_dir=str(tmp_path / "out"), reward="aesthetic", reward_kwargs=nowhere(tmp_path), **tiny)
    assert not (tmp_path / "out").exists()


def test_the_model_path_is_checked_before_the_reward_weights(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model does not exist"):
        finetune(out_dir=str(tmp_path / "out"), reward="aesthetic", reward_kwargs=nowhere(tmp_path),
                 **{**tiny, "model": str(tmp_path / "no_such_model")})


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


def test_bad_values_never_touch_an_existing_run(straight, tiny, tmp_path):
    """Even with overwrite asked for, a bad model, reward or prompts file stops the run before it deletes anything."""
    run = copy_of(straight.out_dir, tmp_path)
    before = snapshot(run)
    for bad in ({"model": str(tmp_path / "no_such_model")}, {"reward": "no_such_reward"},
                {"prompts": str(tmp_path / "no_prompts.txt")}):
        with pytest.raises((ValueError, FileNotFoundError)):
            finetune(out_dir=str(run), **{**tiny, "overwrite": True, **bad})
        assert snapshot(run) == before, bad


def test_a_finished_run_is_kept_unless_overwrite_is_asked_for(straight, tiny, tmp_path):
    run = copy_of(straight.out_dir, tmp_path)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"holds a run \(checkpoints/step_000004.safetensors, .*pytorch_lora_weights"
                                         r".safetensors\); continue it with --resume .*overwrite=true"):
        finetune(Config.from_preset("demo", **tiny), out_dir=str(run))  # as `rlr-fast finetune --preset demo` reruns it
    assert snapshot(run) == before
    finetune(out_dir=str(run), overwrite=True, train_steps=1, **tiny)
    assert [r["step"] for r in records(run)] == [1] and sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000001.safetensors"]


@pytest.mark.slow
def test_a_run_that_died_before_its_first_step_is_reusable(tiny, tmp_path, capsys):
    def unreachable(images, prompts):
        raise RuntimeError("reward server down")

    with pytest.raises(RuntimeError, match="reward server down"):
        finetune(out_dir=str(tmp_path), train_steps=2, reward=unreachable, **tiny)
    assert (tmp_path / "config.yaml").is_file() and not (tmp_path / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="holds no step_.*checkpoint.*starts again without --resume"):
        finetune(resume=str(tmp_path))
    finetune(out_dir=str(tmp_path), train_steps=1, **tiny)  # no overwrite needed
    assert [r["step"] for r in records(tmp_path)] == [1]
    assert "removed the earlier run's outputs" in capsys.readouterr().err


def test_a_second_run_refuses_an_out_dir_in_use(tiny, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(ValueError, match=rf"out_dir {out} is in use by another run \(PID {os.getpid()}\)"):
            finetune(out_dir=str(out), **tiny)
        assert sorted(p.name for p in out.iterdir()) == [".rlr_fast.lock"]


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_checkpoint(straight, tmp_path, capsys, corrupt_tensor):
    run = copy_of(straight.out_dir, tmp_path)
    corrupt_tensor(run / "checkpoints" / "step_000004.safetensors",
                   "lora/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight")
    result = finetune(resume=str(run))
    err = capsys.readouterr().err
    assert "skipping a damaged checkpoint: " in err and "step_000004.safetensors is corrupt" in err
    assert f"resuming {run} at step 2" in err
    assert same_lora(straight.out_dir, result.out_dir)


def test_a_resume_that_fails_validation_leaves_the_run_as_it_was(straight, tmp_path):
    """train_steps below the checkpoint's step is refused (it used to print `done` and record the wrong
    train_steps in config.yaml)."""
    run = copy_of(straight.out_dir, tmp_path)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"train_steps=2 is below the step of .*step_000004.safetensors \(4\): set "
                                         r"train_steps >= 4"):
        finetune(resume=str(run), train_steps=2)
    assert snapshot(run) == before  # config.yaml still says train_steps: 4


def test_done_lists_only_outputs_that_exist(tiny, tmp_path, capsys):
    finetune(out_dir=str(tmp_path), train_steps=1, **{**tiny, "sample_prompts": 0})
    done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("done:")]
    listed = done[0].split(f"outputs in {tmp_path}: ")[1].split(", ")
    assert "samples/" not in listed and all((tmp_path / name).exists() for name in listed)
    assert {"pytorch_lora_weights.safetensors", "metrics.jsonl", "summary.json"} <= set(listed)


@pytest.mark.slow
def test_the_rollout_choice_is_recorded_and_a_failed_cuda_graph_falls_back(straight, tiny, tmp_path, capsys):
    assert {r["rollout"] for r in records(straight.out_dir)} == {"eager"}
    assert straight.metrics["rollout"] == {"kind": "eager", "reason": "device is cpu (CUDA graphs need a GPU)"}
    result = finetune(out_dir=str(tmp_path), train_steps=2, rollout="cuda_graph", **tiny)
    err = capsys.readouterr().err
    assert err.count("rollout: eager from now on (CUDA graph failed: RuntimeError: CUDA-graph rollouts need") == 1
    assert result.metrics["rollout"]["kind"] == "eager" and {r["rollout"] for r in records(tmp_path)} == {"eager"}
    # the fallback redraws from the same generator state: the same updates as an eager run
    assert [r["reward_mean"] for r in records(tmp_path)] == [r["reward_mean"] for r in records(straight.out_dir)][:2]
    assert "sample grid (step 0)" in err  # the grids show progress


def test_gpu_preset_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' \(preset 'sd14'\) needs a CUDA GPU.*--preset demo"):
        finetune("sd14", out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # failed before touching anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_finetune_on_a_gpu_replays_its_rollouts_from_a_cuda_graph(tiny, tmp_path):
    result = finetune(out_dir=str(tmp_path), train_steps=2, device="cuda", dtype="float16", **tiny)
    assert result.metrics["rollout"] == {"kind": "cuda_graph", "reason": None}
    assert all(r["rollout"] == "cuda_graph" and np.isfinite(r["reward_mean"]) for r in records(tmp_path))


def test_public_names():
    import rlr_fast
    from rlr_fast.train import Result

    assert rlr_fast.finetune is finetune and rlr_fast.Result is Result
    assert rlr_fast.checkpoint.find_checkpoint and rlr_fast.inference.generate_images  # lazily imported modules


def test_no_arguments_means_the_demo_preset():
    assert resolve_config(None, {}) == (Config.from_preset("demo"), None)


@pytest.mark.slow
def test_memory_budget_and_profiling(tiny, tmp_path, monkeypatch, capsys):
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

    def fake_plan(cfg, ranks=1):
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
    err = capsys.readouterr().err  # the plan is printed and listed among the outputs (issue 24 §4)
    assert f"memory plan for max_memory_gb=3.0 (in {tmp_path / 'memory_plan.md'}):\n| option | value |" in err
    assert "memory_plan.md" in next(line for line in err.splitlines() if line.startswith("done:"))
    assert {"rollout", "estimate", "reward", "optimizer step", "sample grid"} <= set(ranges)


def test_a_cosine_run_records_its_decaying_learning_rate(tiny, tmp_path):
    """lr_scheduler="cosine" reaches the optimizer: after tiny's one warm-up step, lr x (1 + cos(pi k / 2)) / 2."""
    finetune(out_dir=str(tmp_path), train_steps=3, **{**tiny, "lr_scheduler": "cosine"})
    assert [r["lr"] for r in records(tmp_path)] == pytest.approx([1e-2, 1e-2, 5e-3])


def test_a_run_says_when_warmup_outlasts_it(tiny, tmp_path, capsys):
    """issue 24 §9: warmup_steps > train_steps is valid but easy to miss; said once at the start."""
    finetune(out_dir=str(tmp_path), train_steps=1, **{**tiny, "warmup_steps": 3})
    err = capsys.readouterr().err
    assert err.count("note: warmup_steps=3 > train_steps=1") == 1 and "0.33 x lr" in err
