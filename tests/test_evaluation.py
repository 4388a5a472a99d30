"""Evaluation of a LoRA against its base model: the KL along the chain against an independent
closed form, standard errors and diversity against numbers computed here, held-out prompt sets,
the report files, finetune's eval_every, and `rlr-fast evaluate` end to end with its user errors."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from rlr_fast.cli import main
from rlr_fast.config import Config
from rlr_fast.presets import HELD_OUT, PROMPT_SETS
from rlr_fast.demo_data import parse_prompt
from rlr_fast.evaluation import Evaluator, chain_kl, pairwise_distance, spread
from rlr_fast.inference import generate_images, sample_chain
from rlr_fast.models import tiny_sd
from rlr_fast.lora import add_lora, lora_disabled, lora_parameters
from rlr_fast.rewards import Reward, get_reward

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


class MeanColour(Reward):
    """A reward with a feature space: the image's mean colour (scored by its red channel)."""

    def features(self, images):
        return images.mean((2, 3))

    def score(self, images, prompts):
        return images[:, 0].mean((1, 2))


def perturb(unet, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def lora_models():
    models = tiny_sd(0)
    add_lora(models.unet, rank=2, alpha=2)
    return models


def independent_path_kl(models, traj, cond, eta: float) -> np.ndarray:
    """sum_k ||mu_lora - mu_base||^2 / (2 sigma_k^2) per chain, with diffusers' own DDIM step for the
    means and sigma_k, and the base as a copy of the UNet whose LoRA B matrices are zero."""
    base = copy.deepcopy(models.unet)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_()
    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(traj.num_steps)
    total = np.zeros(traj.batch_size)
    for k, t in enumerate(scheduler.timesteps):
        x = traj.latents[k]
        means = []
        for unet in (models.unet, base):
            eps = unet(x, t, encoder_hidden_states=cond).sample
            means.append(scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample)
        sigma = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.ones_like(x)).prev_sample - means[1]
        total += ((means[0] - means[1]).double() ** 2 / (2 * sigma.double() ** 2)).flatten(1).sum(1).numpy()
    return total


def test_chain_kl_is_zero_at_init_and_the_closed_form_for_a_perturbed_lora(lora_models):
    models, kw = lora_models, dict(num_steps=3, eta=1.0, guidance_scale=1.0)
    cond = models.encode_prompts(PROMPTS)
    with torch.no_grad():
        assert chain_kl(models.unet, sample_chain(models, cond, None, 0, **kw)).abs().max() == 0  # B = 0 at init
        state = {n: p.clone() for n, p in models.unet.named_parameters() if "lora" in n}
        perturb(models.unet, 0.05)
        try:
            traj = sample_chain(models, cond, None, 0, **kw)
            kl = chain_kl(models.unet, traj).sum(0).numpy()
            expected = independent_path_kl(models, traj, cond, eta=1.0)
        finally:
            for n, p in models.unet.named_parameters():
                if n in state:
                    p.copy_(state[n])
    assert expected.min() > 1e-3  # the perturbation moved the sampler measurably
    np.testing.assert_allclose(kl, expected, rtol=1e-4)


def test_lora_disabled_runs_the_base_model_and_restores_the_grad_flags():
    models = tiny_sd(0)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), models.encode_prompts(["a"])
    with torch.no_grad():
        base = models.unet(x, t, encoder_hidden_states=cond).sample
        add_lora(models.unet, rank=2, alpha=2)
        perturb(models.unet, 0.05)
        flags = [p.requires_grad for p in models.unet.parameters()]
        assert not torch.allclose(models.unet(x, t, encoder_hidden_states=cond).sample, base)
        with lora_disabled(models.unet):
            torch.testing.assert_close(models.unet(x, t, encoder_hidden_states=cond).sample, base)
    assert [p.requires_grad for p in models.unet.parameters()] == flags and any(flags)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        with lora_disabled(tiny_sd(0).unet):
            pass


def test_spread_is_mean_and_standard_error_over_the_finite_values():
    stats = spread([1.0, 2.0, 4.0, 7.0, float("nan")])
    std = math.sqrt(((1 - 3.5) ** 2 + (2 - 3.5) ** 2 + (4 - 3.5) ** 2 + (7 - 3.5) ** 2) / 3)
    assert stats["n"] == 4 and stats["nonfinite"] == 1 and stats["mean"] == pytest.approx(3.5)
    assert stats["std"] == pytest.approx(std) and stats["stderr"] == pytest.approx(std / 2)
    assert spread([5.0]) == {"n": 1, "mean": 5.0, "std": None, "stderr": None, "nonfinite": 0}


def test_pairwise_distance_in_pixels_and_features():
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert pairwise_distance(torch.stack([image] * 3)) == 0
    # pairs at RMS distances 0.1, 0.3 and 0.2 (constant offsets)
    assert pairwise_distance(torch.stack([image, image + 0.1, image + 0.3])) == pytest.approx(0.2)
    unit = torch.eye(3, dtype=torch.float64)
    assert pairwise_distance(unit) == pytest.approx(math.sqrt(2))
    assert math.isnan(pairwise_distance(unit[:1]))


def test_held_out_sets_share_nothing_with_their_training_sets():
    for train, held in HELD_OUT.items():
        assert PROMPT_SETS[held] and not set(PROMPT_SETS[held]) & set(PROMPT_SETS[train])
    seen = [parse_prompt(p) for p in PROMPT_SETS["demo"]]
    for prompt in PROMPT_SETS["demo_heldout"]:
        p = parse_prompt(prompt)
        assert not any(p["color"] == s["color"] and p["shape"] == s["shape"] for s in seen), prompt
        assert not any(p["color"] == s["color"] and p["background"] == s["background"] for s in seen), prompt


def test_evaluator_against_samples_and_scores_computed_here(lora_models):
    models = lora_models
    cfg = dataclasses.replace(Config.from_preset("demo"), num_steps=2, guidance_scale=1.0, eta=1.0)
    rewards = {"brightness": get_reward("brightness"), "colour": MeanColour()}
    seeds = [0, 1, 2]
    evaluator = Evaluator(models, cfg, rewards, PROMPTS, seeds, batch_size=len(PROMPTS))
    perturb(models.unet, 0.05, seed=1)
    result = evaluator()

    cond, kw = models.encode_prompts(PROMPTS), dict(num_steps=2, eta=1.0, guidance_scale=1.0)
    with lora_disabled(models.unet):
        base = generate_images(models, cond, None, seeds, **kw)
    lora = generate_images(models, cond, None, seeds, **kw)
    base_b, lora_b = (images.mean((1, 2, 3)).double().numpy() for images in (base, lora))
    assert result["samples"] == 6
    assert result["rewards"]["brightness"]["base"]["mean"] == pytest.approx(base_b.mean(), abs=1e-6)
    assert result["rewards"]["brightness"]["lora"]["mean"] == pytest.approx(lora_b.mean(), abs=1e-6)
    diff = lora_b - base_b
    assert result["rewards"]["brightness"]["lora_minus_base"]["stderr"] == pytest.approx(
        diff.std(ddof=1) / math.sqrt(6), rel=1e-4)  # paired by prompt and seed

    def diversity(images, of):  # mean over prompts of the mean pairwise distance over seeds
        per_prompt = images.reshape(len(seeds), len(PROMPTS), *images.shape[1:]).transpose(0, 1)
        return np.mean([np.mean([of(a, b) for i, a in enumerate(s) for b in s[i + 1:]]) for s in per_prompt])

    rms = lambda a, b: float((a - b).double().pow(2).mean().sqrt())
    unit = lambda a, b: float((torch.nn.functional.normalize(a.double().mean((1, 2)), dim=0)
                               - torch.nn.functional.normalize(b.double().mean((1, 2)), dim=0)).norm())
    assert result["diversity"]["pixels"]["lora"]["mean"] == pytest.approx(diversity(lora, rms), rel=1e-5)
    assert result["diversity"]["features"]["model"] == "colour"
    assert result["diversity"]["features"]["base"]["mean"] == pytest.approx(diversity(base, unit), rel=1e-5)
    assert result["kl"]["lora"]["mean"] > 0 and len(result["kl"]["per_step"]) == 2
    assert sum(result["kl"]["per_step"]) == pytest.approx(result["kl"]["lora"]["mean"], rel=1e-9)
    base_grid, lora_grid = evaluator.grids
    assert base_grid.shape == lora_grid.shape == (2, 3, 3, 16, 16)


def test_evaluator_refuses_what_it_cannot_compare(lora_models):
    cfg = Config.from_preset("demo")
    reward = {"brightness": get_reward("brightness")}
    with pytest.raises(ValueError, match="distinct seeds"):
        Evaluator(lora_models, cfg, reward, PROMPTS, [0, 0])
    with pytest.raises(ValueError, match="UNet has no LoRA"):
        Evaluator(tiny_sd(0), cfg, reward, PROMPTS, [0, 1])


@pytest.fixture(scope="module")
def eval_run(tiny_folder, tmp_path_factory):
    """A 2-step finetune that evaluates at every step."""
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["finetune", "--preset", "demo", "--out", str(out), "--set", f"model={tiny_folder}",
                 "--set", "num_steps=3", "--set", "batch_size=2", "--set", "train_steps=2", "--set", "lr=3e-2",
                 "--set", "eval_every=1", "--set", "eval_num_prompts=2", "--set", "eval_seeds=[0, 1]",
                 "--set", "eval_rewards=[color_match]", "--set", "tensorboard=false", "--set", "sample_prompts=1",
                 "--set", "sample_seeds=[0]"]) == 0
    return out


@pytest.mark.slow
def test_finetune_evaluates_every_n_steps(eval_run):
    records = [json.loads(line) for line in (eval_run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and records[0]["prompt_set"] == "demo_heldout"
    assert set(records[0]["rewards"]) == {"color_match", "brightness"} and records[0]["samples"] == 4
    assert records[0]["kl"]["lora"]["mean"] == 0 < records[2]["kl"]["lora"]["mean"]  # B = 0 at step 0
    base = [r["rewards"]["brightness"]["base"]["mean"] for r in records]
    assert base[0] == base[1] == base[2]  # one base pass per session
    assert Image.open(eval_run / "eval_curve.png").size[1] > 0
    assert json.loads((eval_run / "summary.json").read_text())["eval"]["step"] == 2


@pytest.mark.slow
def test_evaluate_command_writes_the_report(eval_run, capsys):
    out = eval_run / "eval"  # the default
    assert main(["evaluate", "--lora", str(eval_run), "--seeds", "0-2", "--reward", "color_match",
                 "--reward", "brightness", "--batch-size", "4"]) == 0
    printed = capsys.readouterr()
    assert "evaluate: base" in printed.err and "evaluate: LoRA" in printed.err  # progress bars
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["prompts"] == "demo_heldout" and report["settings"]["held_out"] is True
    assert report["samples"] == len(PROMPT_SETS["demo_heldout"]) * 3
    assert set(report["rewards"]) == {"color_match", "brightness"} and report["kl"]["lora"]["mean"] > 0
    markdown = (out / "eval.md").read_text()
    assert "| reward `brightness` |" in markdown and "KL(LoRA ‖ base)" in markdown and "eval_grid.png" in markdown
    assert "| reward `color_match` |" in printed.out
    grid = Image.open(out / "eval_grid.png")  # 8 prompts x 3 seeds a side, 16 px cells enlarged to 128
    assert grid.height > 8 * 128 and grid.width > 2 * 3 * 128


@pytest.mark.parametrize("argv, message", [
    (["--reward", "nope"], "unknown reward 'nope'"),
    (["--prompts", "missing_prompts.txt"], "missing_prompts.txt"),
    (["--reward", "brightness", "--reward", "color_match", "--reward-arg", "x=1"], "say which one"),
    (["--reward-arg", "aesthetic:x=1"], "not scored"),
    (["--reward", "brightness", "--reward", "color_match", "--reward-arg", "color_match:x=1"],
     "reward 'color_match' takes the options (), got ['x']"),
])
def test_evaluate_user_errors(eval_run, argv, message, capsys):
    assert main(["evaluate", "--lora", str(eval_run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rlr-fast evaluate: error:") and message in err, err


def test_evaluate_needs_lora_weights(tmp_path, capsys):
    assert main(["evaluate", "--lora", str(tmp_path)]) == 2
    assert f"--lora {tmp_path} holds no pytorch_lora_weights.safetensors" in capsys.readouterr().err
