"""Sampling and evaluation helpers: device and precision, seeded images, grids, progress bars."""

import pytest
import torch

from rlr_fast.config import Config
from rlr_fast.inference import evaluate_reward, generate_images, prompt_rows, resolve_device
from rlr_fast.models import tiny_sd
from rlr_fast.rewards import get_reward


@pytest.fixture(scope="module")
def models():
    return tiny_sd(0)


def test_a_gpu_preset_on_the_cpu_runs_in_float32_and_says_so(capsys):
    device, cfg = resolve_device(Config.from_preset("sd14", device="cpu"))
    assert device == torch.device("cpu") and cfg.dtype == "float32" and cfg.num_steps == 50
    note = "note: dtype=float16 is for GPUs (autocast); running in float32 on the CPU"
    assert capsys.readouterr().err.strip() == note
    assert resolve_device(Config.from_preset("demo"))[1] == Config.from_preset("demo")  # nothing to change, no note
    assert capsys.readouterr().err == ""


def test_a_gpu_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' \(preset 'sd14'\) needs a CUDA GPU.*--device cpu"):
        resolve_device(Config.from_preset("sd14"))


def test_images_are_fixed_by_their_seed_and_show_progress(models, capsys):
    cond = models.encode_prompts(["a", "b"])
    negative = models.encode_prompts([""])
    kw = dict(num_steps=2, eta=1.0, guidance_scale=2.0)
    both = generate_images(models, cond, negative, [3, 4], desc="sample", **kw)
    assert both.shape == (4, 3, 16, 16) and 0 <= both.min() and both.max() <= 1
    assert "sample:" in capsys.readouterr().err  # a bar over the seeds
    alone = generate_images(models, cond, negative, [4], **kw)
    assert torch.equal(both[2:], alone) and not torch.equal(both[:2], alone)
    assert capsys.readouterr().err == ""  # no bar without desc


def test_prompt_rows_puts_prompts_in_rows_and_seeds_in_columns():
    # seed-major: (seed 0: prompt 0, prompt 1), (seed 1: prompt 0, prompt 1), (seed 2: ...)
    images = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]).float()[:, :, None, None]
    rows = prompt_rows(images, seeds=3)
    assert rows[:, :, 0, 0].tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]


def test_evaluate_reward_statistics_and_progress(models, capsys):
    stats = evaluate_reward(models, get_reward("brightness"), ["a", "b", "c"], [0, 1], num_steps=2, eta=1.0,
                            guidance_scale=1.0, batch_size=2)
    assert stats["n"] == 6 and set(stats["per_prompt"]) == {"a", "b", "c"}
    assert stats["stderr"] == pytest.approx(stats["std"] / 6 ** 0.5)
    err = capsys.readouterr().err
    assert "evaluate:" in err and "/4 [" in err  # a bar over 2 batches of prompts x 2 seeds
