"""The rlr-fast command line: help, finetune end to end, resume, sample, evaluate, user errors."""

import dataclasses
import json
import subprocess
import sys

import pytest

from rlr_fast.cli import main, parse_seeds
from rlr_fast.config import Config


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
    from PIL import Image

    assert sorted(p.name for p in out.glob("*.png")) == [
        "grid.png", "prompt000_seed0.png", "prompt000_seed1.png", "prompt001_seed0.png", "prompt001_seed1.png"]
    assert Image.open(out / "prompt000_seed0.png").size == (16, 16)  # tiny_sd: 8x8 latents, 16 px images


def test_evaluate_prints_reward_statistics(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--lora", str(run_dir), "--prompts", str(prompts), "--seeds", "0,1",
                 "--reward", "color_match", "--out", str(out)]) == 0
    stats = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == stats
    assert stats["n"] == 4 and stats["reward"] == "color_match" and len(stats["per_prompt"]) == 2
    assert stats["stderr"] == pytest.approx(stats["std"] / 2)
    assert -1 <= stats["mean"] <= 0  # color_match lies in [-1, 0]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--set", "lrr=1"], "did you mean 'lr'"),
    (["finetune", "--set", "batch_size=0"], "batch_size must be >= 1, got 0"),
    (["finetune", "--set", "num_steps=4", "--set", "h=4"], "h=4 is too large for num_steps=4"),
    (["finetune", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["sample", "--seeds", "a-b", "--prompt", "x"], "--seeds expects integers"),
    (["sample"], "needs --prompt"),
    (["evaluate", "--prompts", "no_such_set"], "neither a built-in prompt set"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"rlr-fast {argv[0]}: error:")


def test_module_entry_point_exits_2_without_traceback():
    done = subprocess.run([sys.executable, "-m", "rlr_fast", "finetune", "--set", "learning_rate=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown config key 'learning_rate'" in done.stderr


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="names no seed"):
        parse_seeds(",")
