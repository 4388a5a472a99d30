"""The rlr-fast command line: help, finetune end to end, resume, sample, evaluate, user errors."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from rlr_fast.cli import main, parse_seeds
from rlr_fast.config import Config


def one_error_line(capsys, command: str) -> str:
    """The one line of ours on stderr, an error (libraries may log lines of their own before it)."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("rlr-fast ")]
    assert len(ours) == 1 and ours[0].startswith(f"rlr-fast {command}: error: ") and "Traceback" not in err, err
    return ours[0]


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory):
    """`rlr-fast finetune` on a 2-step YAML config plus --set overrides."""
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "tiny.yaml"
    config.write_text(f"preset: demo\nmodel: {tiny_folder}\nnum_steps: 3\nbatch_size: 2\nsample_prompts: 1\n"
                      "sample_seeds: [0]\ntensorboard: false\n")
    out = tmp / "run"
    assert main(["finetune", "--config", str(config), "--set", "train_steps=2", "--set", "lr=1e-2",
                 "--out", str(out)]) == 0
    return out


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert f"\n  {f.name} (" in text, f.name
    for option in ("--preset", "--config", "--set", "--resume", "--out", "--profile"):
        assert option in text
    assert "num_steps (int, demo: 10)" in text


@pytest.mark.parametrize("argv", [["--preset", "sd14"], ["--config", "rlr_fast/configs/sd14.yaml"]])
def test_help_shows_the_chosen_presets_values(argv, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", *argv, "--help"])
    text = capsys.readouterr().out
    assert "values in preset sd14" in text and "num_steps (int, sd14: 50)" in text and "demo:" not in text


@pytest.mark.slow
def test_finetune_end_to_end(run_dir, capsys):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file() and (run_dir / "reward_curve.png").is_file()
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()


def test_resume_from_the_command_line_extends_the_run(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["finetune", "--resume", str(copy), "--set", "train_steps=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out_dir"] == str(copy) and printed["summary"]["steps"] == 3


def test_sample_writes_images(run_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--lora", str(run_dir), "--prompt", "a red circle on a blue background",
                 "--prompt", "a white circle on a black background", "--seeds", "0-1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"settings from the LoRA run's {run_dir / 'config.yaml'}" in err and "sample:" in err  # source; a bar
    from PIL import Image

    assert sorted(p.name for p in out.glob("*.png")) == [
        "grid.png", "prompt000_seed0.png", "prompt000_seed1.png", "prompt001_seed0.png", "prompt001_seed1.png"]
    assert Image.open(out / "prompt000_seed0.png").size == (16, 16)  # tiny_sd: 8x8 latents, 16 px images


def test_evaluate_on_a_prompts_file(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--lora", str(run_dir), "--prompts", str(prompts), "--seeds", "0,1",
                 "--reward", "color_match", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert "| reward `color_match` |" in capsys.readouterr().out
    assert report["samples"] == 4 and report["settings"]["prompts"] == str(prompts)
    assert report["settings"]["held_out"] is None  # a file: neither the training prompts nor their held-out set
    for sampler in ("base", "lora"):
        assert -1 <= report["rewards"]["color_match"][sampler]["mean"] <= 0  # color_match lies in [-1, 0]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "eval_grid.png"]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--set", "lrr=1"], "did you mean 'lr'"),
    (["finetune", "--set", "batch_size=0"], "batch_size must be >= 1, got 0"),
    (["finetune", "--set", "num_steps=4", "--set", "h=4"], "h=4 is too large for num_steps=4"),
    (["finetune", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["finetune", "--set", "rollout=graph"], "rollout must be one of ['auto', 'cuda_graph', 'eager']"),
    (["sample", "--seeds", "a-b", "--prompt", "x"], "--seeds expects integers"),
    (["sample"], "needs --prompt"),
    (["evaluate", "--prompts", "no_such_set"], "pass --lora DIR"),
    (["sample", "--seeds", "0,5-2", "--prompt", "x"], "--seeds range '5-2' runs backwards"),  # it ran seed 0 alone
    (["finetune", "--set", "lr=1e38"], "lr must be at most 1"),  # it used to pass and crash at the first step
    # on a machine without a GPU: the missing folder, not the missing GPU of the sd14 preset
    (["sample", "--model", "/no/such/model", "--prompt", "x"], "Stable Diffusion folder /no/such/model does not exist"),
    # issue 24: a method switch that would silently turn SQDF's KL off; DDPO's refusal names values that work
    (["finetune", "--preset", "sd14", "--set", "method=sqdf"], "start from --preset sqdf"),
    (["finetune", "--preset", "sd14", "--set", "method=ddpo"], "Set grad_accum to 1 or 2"),
    (["finetune", "--preset", "demo", "--set", "preset=sd14"], "--preset demo and --set preset=sd14 disagree"),
    # issue 20: an estimator option the method ignores, given on the command line, is refused (not dropped)
    (["finetune", "--set", "method=ddpo", "--set", "baseline=value"], "baseline='value' is ignored by method='ddpo'"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"rlr-fast {argv[0]}: error:")


def test_sample_without_a_lora_uses_the_preset_made_for_the_model(tiny_folder, tmp_path, capsys):
    """A Stable Diffusion folder without a run's config samples with the sd14 preset, and says so."""
    argv = ["sample", "--model", str(tiny_folder), "--device", "cpu", "--steps", "2", "--seeds", "0",
            "--prompt", "a photo of a cat", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert (f"sample: model {tiny_folder} (no LoRA); settings from preset sd14 and flags: 2 steps, guidance 7.5, "
            "eta 1.0, float32 on cpu") in capsys.readouterr().err
    config = tmp_path / "mine.yaml"
    config.write_text("preset: demo\nguidance_scale: 3.0\n")
    assert main(argv + ["--config", str(config)]) == 0
    assert f"settings from config {config} and flags: 2 steps, guidance 3.0" in capsys.readouterr().err


def test_sample_with_a_pickle_as_the_lora_is_one_line(tiny_folder, tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    torch.save({"weights": torch.ones(2)}, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert main(["sample", "--preset", "demo", "--model", str(tiny_folder), "--lora", str(tmp_path / "lora"),
                 "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    assert "pytorch_lora_weights.safetensors is not a readable safetensors file" in one_error_line(capsys, "sample")


def test_bad_yaml_files_are_one_line(tmp_path, capsys):
    (tmp_path / "syntax.yaml").write_text("lr: [1e-3,\nh: 2\nbatch_size: 4\n")
    assert main(["finetune", "--config", str(tmp_path / "syntax.yaml")]) == 2
    assert "syntax.yaml is not valid YAML" in one_error_line(capsys, "finetune")
    (tmp_path / "deletes.yaml").write_text("overwrite: true\n")
    assert main(["finetune", "--config", str(tmp_path / "deletes.yaml")]) == 2
    assert "asked for on the command line only (--set overwrite=true)" in one_error_line(capsys, "finetune")


def test_an_unwritable_out_dir_is_one_line(unwritable_dir, capsys):
    out = unwritable_dir / "run"
    assert main(["finetune", "--out", str(out)]) == 2
    assert str(out) in one_error_line(capsys, "finetune")


def test_resume_from_a_damaged_checkpoint_is_one_line(run_dir, tmp_path, capsys, corrupt_tensor):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    corrupt_tensor(copy / "checkpoints" / "step_000002.safetensors", "rng/torch_cpu", how="random")
    assert main(["finetune", "--resume", str(copy)]) == 2
    assert "is corrupt: tensor 'rng/torch_cpu'" in one_error_line(capsys, "finetune")


def test_sigterm_and_a_second_run_from_the_command_line(tiny_folder, tmp_path, capsys):
    """While a run holds its out_dir a second one refuses in one line; SIGTERM then stops the first
    with a checkpoint, exit status 143 and the resume command."""
    config = tmp_path / "long.yaml"
    config.write_text(f"model: {tiny_folder}\nnum_steps: 3\nbatch_size: 2\nsample_prompts: 0\ntensorboard: false\n"
                      "train_steps: 500\ncheckpoint_every: 0\n")
    out = tmp_path / "run"
    argv = ["finetune", "--config", str(config), "--out", str(out)]
    second = []

    def when_running():
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        second.append(main(argv))
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=when_running, daemon=True)
    watcher.start()
    assert main(argv) == 128 + signal.SIGTERM
    watcher.join()
    err = capsys.readouterr().err
    assert second == [2]
    assert f"rlr-fast finetune: error: out_dir {out} is in use by another run (PID {os.getpid()})" in err
    assert "Traceback" not in err and f"Resume with: rlr-fast finetune --resume {out}" in err
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{steps:06d}.safetensors"]
    assert not (out / ".rlr_fast.lock").exists()


@pytest.mark.slow
def test_module_entry_point_exits_2_without_traceback():
    done = subprocess.run([sys.executable, "-m", "rlr_fast", "finetune", "--set", "learning_rate=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown config key 'learning_rate'" in done.stderr


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="names no seed"):
        parse_seeds(",")
    with pytest.raises(ValueError, match="runs backwards; write it low-high, e.g. '2-5'"):
        parse_seeds("0,5-2")  # it used to give [0]


def test_resume_elsewhere_is_refused(run_dir, tmp_path, capsys):
    """--out with --resume used to be ignored without a word."""
    assert main(["finetune", "--resume", str(run_dir), "--out", str(tmp_path / "other")]) == 2
    assert f"is not the folder of the run resumed ({run_dir})" in one_error_line(capsys, "finetune")
    assert main(["finetune", "--preset", "demo", "--resume", str(run_dir), "--out", str(tmp_path / "other")]) == 2
    assert f"is not the folder of the run resumed ({run_dir})" in one_error_line(capsys, "finetune")
    assert not (tmp_path / "other").exists()


# ---- issue 24 §2 and §9: settings honoured as recorded, and said


def test_sample_honours_the_runs_resolution(run_dir, tmp_path, capsys):
    """`sample` used to draw at the model's native size whatever the run's `resolution`."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("resolution: null", "resolution: 32"))
    assert main(["sample", "--lora", str(run), "--prompt", "a red circle on a blue background", "--seeds", "0",
                 "--out", str(tmp_path / "samples")]) == 0
    assert "resolution 32" in capsys.readouterr().err
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "prompt000_seed0.png").size == (32, 32)  # native: 16 px


def test_set_preset_on_resume_is_refused_not_recorded(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["finetune", "--resume", str(run), "--set", "preset=sd14", "--set", "train_steps=3"]) == 2
    assert "--set preset=sd14 with --resume" in one_error_line(capsys, "finetune")
    assert "preset: demo" in (run / "config.yaml").read_text()


def test_help_says_mappings_merge_and_what_the_keys_mean(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a mapping merges key by key into the preset's" in text
    assert "k, the likelihood-ratio steps drawn per update from C" in text and "|C| the number of steps in C" in text
    assert "baselines the number of baselines compared" in text
    assert "'reference' (plain PyTorch, the specification)" in text and "'triton' (the Triton kernel" in text
    assert "options below" not in text  # max_memory_gb's options are named, not "below" (they are above it)


def test_a_command_prints_no_torchvision_warning(tmp_path):
    """diffusers' pipeline import used to make transformers warn about torchvision on every command."""
    done = subprocess.run([sys.executable, "-m", "rlr_fast", "sample", "--model", "default", "--prompt", "a red circle",
                           "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr and "sample: model default (no LoRA)" in done.stderr
