"""Sampling helpers: device and precision, seeded images, grids, progress bars."""

import pytest
import torch

from rlr_fast.config import Config
from rlr_fast.inference import generate_images, prompt_rows, resolve_device, sample_chain
from rlr_fast.models import tiny_sd


@pytest.fixture(scope="module")
def models():
    return tiny_sd(0)


def test_a_gpu_preset_on_the_cpu_runs_in_float32_and_says_so(capsys):
    """The reward network too (issue 24 §2: a float16 CLIP backward on the CPU took 693 s instead of 5.9 s)."""
    device, cfg = resolve_device(Config.from_preset("sd14", device="cpu"))
    assert device == torch.device("cpu") and cfg.dtype == "float32" and cfg.num_steps == 50
    assert cfg.reward_kwargs == {"dtype": "float32"}
    note = ("note: dtype=float16 (autocast) and the reward network's dtype=float16 are for GPUs; running in float32 "
            "on the CPU")
    assert capsys.readouterr().err.strip() == note  # one line for both
    evals = Config.from_preset("demo", eval_rewards=("hpsv2", "pickscore"), reward_kwargs={"dtype": torch.bfloat16},
                               eval_reward_kwargs={"hpsv2": {"dtype": "float16", "path": "/h"}, "pickscore": {}})
    cfg = resolve_device(evals)[1]
    assert cfg.reward_kwargs == {"dtype": "float32"} and cfg.dtype == "float32"
    assert cfg.eval_reward_kwargs == {"hpsv2": {"dtype": "float32", "path": "/h"}, "pickscore": {}}
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert resolve_device(Config.from_preset("demo"))[1] == Config.from_preset("demo")  # nothing to change, no note
    assert capsys.readouterr().err == ""


def test_a_gpu_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' \(preset 'sd14'\) needs a CUDA GPU.*--device cpu"):
        resolve_device(Config.from_preset("sd14"))


def test_float64_runs_on_the_cpu_only(monkeypatch, capsys):
    cfg = Config.from_preset("demo", dtype="float64")
    assert resolve_device(cfg) == (torch.device("cpu"), cfg)  # kept in float64, without a note
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"dtype='float64' runs on the CPU only.*device='cuda' is a GPU; "
                                         r"set device=cpu"):
        resolve_device(Config.from_preset("demo", dtype="float64", device="cuda"))


def test_a_float64_model_samples_in_float64_from_the_float32_start(models):
    cond, kw = models.encode_prompts(["a", "b"]), dict(num_steps=2, eta=1.0, guidance_scale=1.0)
    precise = tiny_sd(0)
    precise.unet.to(torch.float64)
    chain = sample_chain(precise, cond.double(), None, 5, **kw)
    assert chain.latents.dtype == chain.x0.dtype == torch.float64
    assert torch.equal(chain.latents[0], sample_chain(models, cond, None, 5, **kw).latents[0].double())


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


def test_a_seed_gives_every_model_the_same_start_and_noises(models):
    cond, kw = models.encode_prompts(["a", "b"]), dict(num_steps=2, eta=1.0, guidance_scale=1.0)
    other = tiny_sd(1)
    first, second = sample_chain(models, cond, None, 5, **kw), sample_chain(other, cond, None, 5, **kw)
    assert torch.equal(first.latents[0], second.latents[0]) and torch.equal(first.noises, second.noises)
    assert not torch.equal(first.x0, second.x0)  # the models differ, their samples too
    assert not torch.equal(sample_chain(models, cond, None, 6, **kw).noises, first.noises)
