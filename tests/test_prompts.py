"""Prompt schedules: parsing, which step gets which prompt, the distinct-text table, and bad schedules."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rlr_fast.prompts import PromptBank, PromptSchedule, PromptSteps, Segment, step_conditioning

BASE = "a red circle on a blue background"
THREE = {BASE: [{"prompt": "a shape", "from_step": 0.0, "to_step": 0.3},
                {"prompt": "a circle", "from_step": 0.3, "to_step": 0.7},
                {"prompt": BASE, "from_step": 0.7, "to_step": 1.0}]}


def test_steps_follow_k_over_T():
    """Step k takes the segment holding k / T, so the split moves with T as documented."""
    schedule = PromptSchedule.load(THREE)
    assert schedule.prompts_at(BASE, 10) == ["a shape"] * 3 + ["a circle"] * 4 + [BASE] * 3
    # T = 4: k / T = 0, .25 | .5 | .75
    assert schedule.prompts_at(BASE, 4) == ["a shape", "a shape", "a circle", BASE]
    assert schedule.prompts_at("unscheduled", 3) == ["unscheduled"] * 3
    assert list(Segment("x", 0.25, 0.5).steps(8)) == [2, 3]


def test_segments_may_be_given_in_any_order_and_round_trip(tmp_path):
    shuffled = {BASE: list(reversed(THREE[BASE]))}
    schedule = PromptSchedule.load(shuffled)
    assert schedule.to_dict() == THREE
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(shuffled))
    assert PromptSchedule.load(str(path)).to_dict() == THREE
    # what --set passes: YAML text; integers 0 and 1 are fractions too
    text = f"{{'{BASE}': [{{prompt: a, from_step: 0, to_step: 0.5}}, {{prompt: b, from_step: 0.5, to_step: 1}}]}}"
    assert PromptSchedule.load(text).prompts_at(BASE, 2) == ["a", "b"]


def test_prompt_steps_encode_each_text_once():
    prompts = [BASE, "a green square on a black background"]
    steps = PromptSteps(prompts, THREE, num_steps=10)
    assert steps.texts == prompts + ["a shape", "a circle"]
    assert steps.step_ids.shape == (2, 10)
    assert [steps.texts[i] for i in steps.step_ids[0]] == PromptSchedule.load(THREE).prompts_at(BASE, 10)
    assert steps.step_ids[1].tolist() == [1] * 10
    assert PromptSteps(prompts).step_ids is None and PromptSteps(prompts).texts == prompts


def test_step_conditioning_keeps_the_distinct_embeddings_of_a_batch():
    prompts = [BASE, "a green square on a black background"]
    steps = PromptSteps(prompts, THREE, num_steps=10)
    embeddings = torch.arange(len(steps.texts), dtype=torch.float32).reshape(-1, 1, 1).expand(-1, 2, 3)
    ids = torch.tensor([1, 1, 0])
    kw = step_conditioning(embeddings, steps.step_ids, ids)
    assert kw["prompt_index"].shape == (10, 3)
    # which text each (step, sample) reads, through the compact table
    got = kw["encoder_hidden_states"][kw["prompt_index"]][..., 0, 0]
    assert torch.equal(got, steps.step_ids[ids].T.float())
    assert len(kw["encoder_hidden_states"]) == 4  # the three texts of prompt 0, and prompt 1
    plain = step_conditioning(embeddings, None, ids)
    assert set(plain) == {"encoder_hidden_states"} and torch.equal(plain["encoder_hidden_states"], embeddings[ids])


def _segments(*parts):
    return {BASE: [{"prompt": p, "from_step": a, "to_step": b} for p, a, b in parts]}


@pytest.mark.parametrize("spec, match", [
    (_segments(("a", 0.0, 0.4), ("b", 0.5, 1.0)), r"\[0.4, 0.5\) \(step 4 of num_steps=10\) is covered by no segment"),
    (_segments(("a", 0.0, 0.6), ("b", 0.4, 1.0)), r"overlap on \[0.4, 0.6\) \(steps 4..5 of num_steps=10\)"),
    (_segments(("a", 0.2, 1.0)), r"\[0.0, 0.2\) \(steps 0..1 of num_steps=10\) is covered by no segment"),
    (_segments(("a", 0.0, 0.8)), r"\[0.8, 1.0\] \(steps 8..9 of num_steps=10\) is covered by no segment"),
    (_segments(("a", 0.0, 1.5)), r"to_step=1.5 is outside \[0, 1\]: steps are fractions"),
    (_segments(("a", 0.0, 5)), r"to_step=5 is outside \[0, 1\]"),
    (_segments(("a", 0.5, 0.5), ("b", 0.0, 1.0)), r"from_step=0.5 must be < to_step=0.5"),
    (_segments(("", 0.0, 1.0)), r"prompt must be a non-empty string, got ''"),
    ({BASE: []}, r"must be a non-empty list"),
    ({}, r"must be a non-empty mapping"),
    ({BASE: [{"prompt": "a", "from": 0.0, "to_step": 1.0}]}, r"unknown: \['from'\], missing: \['from_step'\]"),
    ("no_such_schedule.yaml", r"prompt_schedule file no_such_schedule.yaml does not exist"),
])
def test_bad_schedules_are_named(spec, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        PromptSchedule.load(spec, num_steps=10)


def test_non_numeric_step_is_a_type_error():
    with pytest.raises(TypeError, match=r"from_step must be a number in \[0, 1\], got 'start'"):
        PromptSchedule.load(_segments(("a", "start", 1.0)))


def test_gap_without_steps_is_still_an_error():
    """A gap too thin to hold a step at this T would hold one at a larger T."""
    with pytest.raises(ValueError, match=r"\[0.41, 0.45\) \(no whole step at num_steps=10"):
        PromptSchedule.load(_segments(("a", 0.0, 0.41), ("b", 0.45, 1.0)), num_steps=10)


def test_segment_without_a_step_and_unknown_base_prompt():
    schedule = PromptSchedule.load(_segments(("a", 0.0, 0.05), ("b", 0.05, 0.1), ("c", 0.1, 1.0)))
    schedule.check(20)  # k / 20 = 0, 0.05, 0.1, ...: each segment gets a step
    with pytest.raises(ValueError, match=r"segment 'b' \[0.05, 0.1\) gets no step at num_steps=10"):
        schedule.check(10)
    with pytest.raises(ValueError, match=r"base prompt\(s\) \['a red circle on a blue background'\] that are not in"):
        PromptSchedule.load(THREE).check(10, ["a red circle on a white background"])
    # sampling prompts the schedule does not name is fine: they condition every step themselves
    assert PromptSteps(["a red circle on a white background"], THREE, num_steps=10).step_ids.tolist() == [[0] * 10]


# ---- in a run: config, PromptBank, finetune's sample grids, the CLI -------------------------------------


class _CountingEncoder:
    """encode_prompts that records every text it is asked for."""

    def __init__(self):
        self.seen = []

    def encode_prompts(self, texts):
        self.seen += texts
        return torch.stack([torch.full((2, 3), float(len(t))) for t in texts])


def test_prompt_bank_encodes_each_text_once():
    encoder = _CountingEncoder()
    prompts = [BASE, "a green square on a black background"]
    bank = PromptBank(encoder, prompts, "", THREE, num_steps=10, chunk=3)
    assert sorted(encoder.seen) == sorted(set(prompts) | {"a shape", "a circle", ""})  # each once, across chunks
    assert bank.steps.scheduled == 1
    kw = bank.batch(torch.tensor([0, 0, 1]), guidance_scale=2.0)
    assert kw["prompt_index"].shape == (10, 3) and kw["negative_encoder_hidden_states"].shape == (3, 2, 3)
    plain = PromptBank(_CountingEncoder(), prompts, "").batch(torch.tensor([1, 0]), guidance_scale=1.0)
    assert "prompt_index" not in plain and plain["encoder_hidden_states"].shape == (2, 2, 3)


def _schedule_file(tmp_path, base="a red circle"):
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({base: [{"prompt": "a shape", "from_step": 0.0, "to_step": 0.3},
                                           {"prompt": base, "from_step": 0.3, "to_step": 1.0}]}))
    return path


def test_config_reads_a_schedule_file_and_records_its_contents(tmp_path):
    from rlr_fast.config import Config, load_config

    path = _schedule_file(tmp_path)
    cfg = load_config(sets=(f"prompt_schedule={path}",))
    assert cfg.prompt_schedule == yaml.safe_load(path.read_text())
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())).prompt_schedule == cfg.prompt_schedule
    inline = load_config(sets=("prompt_schedule={x: [{prompt: y, from_step: 0, to_step: 1}]}",))
    assert inline.prompt_schedule == {"x": [{"prompt": "y", "from_step": 0.0, "to_step": 1.0}]}
    assert load_config(sets=(f"prompt_schedule={path}", "prompt_schedule=none")).prompt_schedule is None
    with pytest.raises(ValueError, match=r"\[0.5, 1.0\] \(steps 5..9 of num_steps=10\) is covered by no segment"):
        load_config(sets=("prompt_schedule={x: [{prompt: y, from_step: 0, to_step: 0.5}]}",))  # demo: T = 10
    with pytest.raises(ValueError, match=r"segment 'x' \[0.05, 1.0\) gets no step at num_steps=1\b"):
        Config.from_preset("demo", num_steps=1, method="full_bp", prompt_schedule={
            "x": [{"prompt": "y", "from_step": 0, "to_step": 0.05}, {"prompt": "x", "from_step": 0.05, "to_step": 1}]})


def test_training_rollouts_follow_the_schedule(tmp_path):
    """What one update's rollout is conditioned on, read back as texts per (step, sample)."""
    from rlr_fast.config import Config
    from rlr_fast.models import tiny_sd
    from rlr_fast.lora import add_lora, lora_parameters
    from rlr_fast.rewards import get_reward
    from rlr_fast.rollout import rollout
    from rlr_fast.update import OnPolicy, StepContext

    models = tiny_sd(0)
    add_lora(models.unet, seed=0)
    cfg = Config(num_steps=3, batch_size=4, images_per_prompt=2, prompt_schedule=str(_schedule_file(tmp_path)))
    bank = PromptBank(models, ["a red circle", "a blue square"], "", cfg.prompt_schedule, cfg.num_steps)
    seen = []

    def recording_rollout(x_T, noises, **kw):
        seen.append(kw)
        return rollout(models.unet, models.scheduler, x_T, noises=noises, **kw)

    generators = {"sampling": torch.Generator().manual_seed(0), "estimator": torch.Generator().manual_seed(1)}
    OnPolicy(StepContext(cfg, models, bank, get_reward("brightness"), recording_rollout, lora_parameters(models.unet),
                         generators, torch.device("cpu"), torch.float32)).gradients()
    used = seen[0]["encoder_hidden_states"][seen[0]["prompt_index"]]  # (T, B, L, D)
    texts = [[next(t for t, e in zip(bank.steps.texts, bank.embeddings) if torch.equal(e, used[k, b]))
              for k in range(3)] for b in range(4)]
    assert sorted(texts) == [["a blue square"] * 3] * 2 + [["a shape", "a red circle", "a red circle"]] * 2


def test_shipped_schedule_config_fits_the_demo_prompts():
    from pathlib import Path

    import rlr_fast
    from rlr_fast.config import load_config
    from rlr_fast.presets import load_prompts

    cfg = load_config(path=Path(rlr_fast.__file__).parent / "configs" / "dcot_demo.yaml")
    schedule = PromptSchedule.load(cfg.prompt_schedule).check(cfg.num_steps, load_prompts(cfg.prompts))
    assert schedule.prompts_at("a red circle on a blue background", cfg.num_steps)[3:5] == [
        "a red circle on a blue background", "a green circle on a blue background"]


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    """Overrides of a one-step finetune on the tiny model, two prompts of which the first is scheduled."""
    tmp = tmp_path_factory.mktemp("schedule")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    return dict(model=str(tiny_folder), prompts=str(prompts), prompt_schedule=str(_schedule_file(tmp)), num_steps=3,
                batch_size=2, images_per_prompt=2, sample_prompts=2, sample_seeds=(0,), tensorboard=False,
                train_steps=1, guidance_scale=2.0)


@pytest.mark.slow
def test_finetune_samples_its_grid_under_the_schedule(tiny_run, tiny_folder, tmp_path, capsys):
    """The step-0 grid (base model) equals images made with the conditioning written out by hand:
    "a shape" at step 0 and "a red circle" at steps 1-2 for the first row, "a blue square" throughout.
    The run says on stderr that a schedule is active."""
    from rlr_fast.inference import generate_images, prompt_rows
    from rlr_fast.models import load_sd
    from rlr_fast.train import finetune

    result = finetune(out_dir=str(tmp_path / "run"), **tiny_run)
    assert capsys.readouterr().err.count("note: a prompt schedule is active") == 1
    assert yaml.safe_load(result.config_path.read_text())["prompt_schedule"]["a red circle"][0]["prompt"] == "a shape"
    models = load_sd(tiny_folder)
    emb = models.encode_prompts(["a shape", "a red circle", "a blue square"])
    index = torch.tensor([[0, 2], [1, 2], [1, 2]])  # (T, images)
    kw = dict(num_steps=3, eta=1.0, guidance_scale=2.0)
    negative = models.encode_prompts([""])
    want = prompt_rows(generate_images(models, emb, negative, [0], prompt_index=index, **kw), 1)
    plain = prompt_rows(generate_images(models, emb[1:], negative, [0], **kw), 1)
    grid = torch.from_numpy(np.array(Image.open(result.grid_paths[0]))).float() / 255
    cell = grid[2:2 + 128:8, 2:2 + 128:8].permute(2, 0, 1)  # first row's image, back to 16 x 16 px

    def pixels(image):
        return (image.clamp(0, 1) * 255).round() / 255

    assert torch.equal(cell, pixels(want[0])) and not torch.equal(cell, pixels(plain[0]))


def test_finetune_refuses_a_schedule_for_a_prompt_not_in_the_set(tiny_run, tmp_path):
    from rlr_fast.train import finetune

    out = tmp_path / "run"
    elsewhere = str(_schedule_file(tmp_path, "a green triangle"))
    with pytest.raises(ValueError, match=r"names base prompt\(s\) \['a green triangle'\] that are not in the prompt"):
        finetune(out_dir=str(out), **dict(tiny_run, prompt_schedule=elsewhere))
    assert not out.exists()


def test_cli_sample_follows_the_configs_schedule(tiny_run, tmp_path, capsys):
    from rlr_fast.cli import main

    settings = {k: v for k, v in tiny_run.items() if k in ("model", "num_steps", "guidance_scale")}
    for name, extra in (("scheduled", {"prompt_schedule": tiny_run["prompt_schedule"]}), ("plain", {})):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**settings, **extra}))
        assert main(["sample", "--prompt", "a red circle", "--prompt", "a blue square", "--seeds", "0",
                     "--config", str(config), "--out", str(tmp_path / name)]) == 0
        said = "1 of the 2 prompts follow the config's prompt_schedule" in capsys.readouterr().err
        assert said == (name == "scheduled")

    def image(run, i):
        return np.asarray(Image.open(tmp_path / run / f"prompt{i:03d}_seed0.png"))

    assert not np.array_equal(image("scheduled", 0), image("plain", 0))
    assert np.array_equal(image("scheduled", 1), image("plain", 1))
