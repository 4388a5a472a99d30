"""Config: presets, typed parsing of YAML and --set values, and clear errors for bad input."""

import dataclasses
import re

import pytest

from rlr_fast import finetune
from rlr_fast.config import Config, config_help, load_config
from rlr_fast.presets import PRESETS, load_prompts


def test_presets_validate_and_carry_their_documented_settings():
    demo = Config.from_preset("demo")
    assert (demo.model, demo.device, demo.preset) == ("default", "cpu", "demo")
    sd14 = Config.from_preset("sd14")
    assert (sd14.num_steps, sd14.guidance_scale, sd14.negative_prompt, sd14.eta) == (50, 7.5, "", 1.0)
    assert (sd14.lora_rank, sd14.device, sd14.reward, sd14.h) == (4, "cuda", "aesthetic", 2)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match=r"unknown preset 'sd15'.*demo.*sd14"):
        Config.from_preset("sd15")


@pytest.mark.parametrize("key, closest", [("lrr", "lr"), ("batchsize", "batch_size"), ("num_step", "num_steps")])
def test_unknown_key_names_the_closest_valid_key(key, closest):
    with pytest.raises(ValueError, match=rf"unknown config key '{key}'; did you mean '{closest}'"):
        Config.from_preset("demo", **{key: 1})
    with pytest.raises(ValueError, match=rf"did you mean '{closest}'"):
        load_config(sets=[f"{key}=1"])


@pytest.mark.parametrize("key, value", [("lr", "fast"), ("batch_size", 2.5), ("batch_size", "two"),
                                        ("checkpoint_vae", "maybe"), ("betas", 0.9), ("reward_kwargs", "[1, 2]"),
                                        ("num_steps", True)])
def test_wrong_type_is_a_type_error_naming_key_and_value(key, value):
    with pytest.raises(TypeError, match=rf"^{key}(\[0\])? must be") as error:
        Config.from_preset("demo", **{key: value})
    assert str(value) in str(error.value)


def test_wrong_type_in_a_directly_built_config_is_caught_by_validate():
    with pytest.raises(TypeError, match="lr must be of type float, got 'x'"):
        Config(lr="x").validate()


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan")])
def test_non_positive_learning_rate(lr):
    with pytest.raises(ValueError, match=r"lr must be > 0"):
        Config.from_preset("demo", lr=lr)


def test_learning_rate_curves():
    """Warm-up, then constant or a half cosine to 0 at train_steps: the cosine part against torch's
    CosineAnnealingLR started where the warm-up ends; an unknown decay is a one-line error."""
    import torch

    from rlr_fast.update import learning_rate

    constant = Config.from_preset("demo", lr=0.1, warmup_steps=2, train_steps=8)
    assert [learning_rate(constant, s) for s in range(8)] == pytest.approx([0.05] + [0.1] * 7)
    for warmup in (0, 3):
        cfg = Config.from_preset("demo", lr=0.1, warmup_steps=warmup, train_steps=10, lr_scheduler="cosine")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10 - warmup)
        cosine = []
        for _ in range(10 - warmup):
            cosine.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            reference.step()
        ramp = [0.1 * (s + 1) / warmup for s in range(warmup)]
        assert [learning_rate(cfg, s) for s in range(10)] == pytest.approx(ramp + cosine)
    with pytest.raises(ValueError, match=r"lr_scheduler must be one of \['constant', 'cosine'\], got 'linear'"):
        Config.from_preset("demo", lr_scheduler="linear")


def test_batch_size_zero():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        load_config(sets=["batch_size=0"])


def test_h_too_large_for_num_steps():
    with pytest.raises(ValueError, match=r"h=10 is too large for num_steps=10.*1 \+ 10 > 10"):
        Config.from_preset("demo", num_steps=10, h=10)
    Config.from_preset("demo", num_steps=10, h=9)  # f + h = T is the largest valid h


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=6, images_per_prompt=4), "images_per_prompt=4 must divide batch_size=6"),
    (dict(images_per_prompt=1, baseline="loo_prompt"), "loo_prompt' needs images_per_prompt >= 2"),
    (dict(eta=0.0), "eta must be > 0"),
    (dict(method="rlhf"), r"method must be one of .*'rlhf'"),
    (dict(baseline="lo"), "did you mean 'loo'"),
    (dict(device="gpu"), "device must be one of"),
    (dict(dtype="fp16"), "dtype must be one of"),
    (dict(zo_steps=8, num_steps=10), r"zo_steps=8 must be in 1..7"),
    (dict(betas=(0.9, 1.0)), r"betas must each be in \[0, 1\)"),
    (dict(baseline="value", rollout="cuda_graph"), "which rollout='cuda_graph' does not store"),
    (dict(baseline="value", value_fit="loo", batch_size=4), r"value_fit='loo' .* needs batch_size >= 5 \(got 4\)"),
    (dict(baseline="value", value_decay=-0.1), r"value_decay must be in \[0, 1\], got -0.1"),
])
def test_inconsistent_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        Config.from_preset("demo", **overrides)


def test_set_values_are_parsed_by_field_type():
    cfg = load_config(sets=["lr=1e-4", "batch_size=4", "checkpoint_unet=yes", "betas=0.8,0.95", "zo_steps=none",
                            "baseline=0.25", "j=3", "normalize=true", "sample_seeds=[5, 6]",
                            "reward_kwargs={clip_path: /w/clip}", "max_grad_norm=null", "negative_prompt="])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 4 and cfg.checkpoint_unet is True
    assert cfg.betas == (0.8, 0.95) and cfg.sample_seeds == (5, 6)
    assert cfg.zo_steps is None and cfg.max_grad_norm is None
    assert cfg.baseline == 0.25 and cfg.j == 3 and cfg.normalize is True
    assert cfg.reward_kwargs == {"clip_path": "/w/clip"} and cfg.negative_prompt == ""


def test_set_without_equals_sign():
    with pytest.raises(ValueError, match="--set expects key=value, got 'lr'"):
        load_config(sets=["lr"])


def test_yaml_file_preset_then_keys_then_sets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: sd14\nlr: 1e-4\ntrain_steps: 7\nbetas: [0.5, 0.6]\n")
    cfg = load_config(path=path, sets=["train_steps=9"])
    assert cfg.preset == "sd14" and cfg.num_steps == 50  # from the preset
    assert cfg.lr == 1e-4 and cfg.betas == (0.5, 0.6)  # YAML reads 1e-4 as a string; parsed as float
    assert cfg.train_steps == 9  # --set wins


@pytest.mark.parametrize("text, error, message", [
    ("lr_rate: 0.1\n", ValueError, "did you mean 'lr'"),
    ("- a\n- b\n", ValueError, "must hold a mapping"),
    ("lr: [1\n", ValueError, "not valid YAML"),
    ("lr: [1e-3,\nh: 2\nbatch_size: 4\n", ValueError, r"not valid YAML: .* at line 3, column \d+$"),
    ("overwrite: yes\n", ValueError, r"sets overwrite: True; .*on the command line only \(--set overwrite=true\)"),
])
def test_bad_yaml_files(tmp_path, text, error, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message) as raised:
        load_config(path=path)
    assert "\n" not in str(raised.value)  # one line, also for YAML syntax errors


def test_a_run_records_its_config_without_what_one_command_asked_for(tmp_path):
    cfg = Config.from_preset("demo", overwrite=True, resume="out/x", lr=2e-3)
    recorded = cfg.as_run()
    assert (recorded.overwrite, recorded.resume, recorded.lr) == (False, None, 2e-3)
    path = tmp_path / "config.yaml"
    path.write_text(recorded.to_yaml())
    assert load_config(path=path) == recorded  # a run's config.yaml is a valid --config
    assert not any(preset.get("overwrite") for preset in PRESETS.values())  # no preset deletes a run
    load_config(path=path, sets=["overwrite=true"])  # the command line may ask for it


def test_sd14_yaml_reads_reward_weights_from_rlr_fast_weights(tmp_path, monkeypatch):
    """The shipped sd14.yaml pins no weight paths, so $RLR_FAST_WEIGHTS (README) decides where they are."""
    from pathlib import Path

    import rlr_fast
    from rlr_fast.rewards import get_reward

    cfg = load_config(path=Path(rlr_fast.__file__).parent / "configs" / "sd14.yaml")
    monkeypatch.setenv("RLR_FAST_WEIGHTS", str(tmp_path / "my_weights"))
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path / "my_weights" / "clip-vit-large-patch14")):
        get_reward(cfg.reward, **cfg.reward_kwargs)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        load_config(path=tmp_path / "nope.yaml")


def test_shipped_yaml_configs_load():
    from pathlib import Path

    import rlr_fast

    folder = Path(rlr_fast.__file__).parent / "configs"
    assert load_config(path=folder / "demo.yaml").preset == "demo"
    assert load_config(path=folder / "sd14.yaml").reward == "aesthetic"


def test_prompts_from_set_and_file(tmp_path):
    assert len(load_prompts("demo")) >= 8
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na cat\n\n  a dog  # a comment\n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]


def test_empty_prompt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(path))


def test_unknown_prompt_set():
    with pytest.raises(FileNotFoundError, match="neither a built-in prompt set .*nor an existing file"):
        load_prompts("dem")


def test_round_trip_through_dict():
    cfg = Config.from_preset("sd14", lr=2e-4)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_help_documents_every_key():
    text = config_help()
    for f in dataclasses.fields(Config):
        assert f"  {f.name} (" in text and f.metadata["doc"] in text
    assert set(PRESETS) == {"demo", "sd14", "sqdf", "sdxl", "sd35m"}
    assert "num_steps (int, demo: 10)" in text and "num_steps (int, sd14: 50)" in config_help("sd14")


def test_sampling_settings_validate_without_the_estimators_chain():
    cfg = Config.from_preset("demo").with_overrides({"num_steps": 2}, validate=False)
    with pytest.raises(ValueError, match="h=2 is too large for num_steps=2"):
        cfg.validate()
    assert cfg.validate(chain=False) is cfg


# ---- issue 24 §2: no silent wrong settings from --set


def test_switching_to_sqdf_without_its_alpha_is_refused_naming_the_sqdf_preset():
    """--preset sd14 --set method=sqdf used to run SQDF with alpha 0, gamma 1 and no replay (KL off)."""
    with pytest.raises(ValueError, match=r"method=sqdf on preset 'sd14' .*sqdf_alpha': 0\.0.*--preset sqdf"):
        load_config(preset="sd14", sets=["method=sqdf"])
    with pytest.raises(ValueError, match="--preset sqdf"):
        load_config(sets=["method=sqdf", "sqdf_gamma=0.9"])  # the demo preset; gamma alone does not turn the KL on
    chosen = load_config(preset="sd14", sets=["method=sqdf", "sqdf_alpha=1e-3"])  # an explicit alpha is a choice
    assert (chosen.method, chosen.sqdf_alpha) == ("sqdf", 1e-3)
    assert load_config(preset="sqdf", sets=["lr=1e-4"]).sqdf_alpha == PRESETS["sqdf"]["sqdf_alpha"]
    assert load_config(preset="sqdf", sets=["method=rlr", "replay_capacity=0"]).method == "rlr"


def test_mapping_valued_sets_merge_key_by_key(tmp_path):
    """--set 'reward_kwargs={clip_path: ...}' used to drop the sd14 preset's {dtype: float16}."""
    cfg = load_config(preset="sd14", sets=["reward_kwargs={clip_path: /w/clip}"])
    assert cfg.reward_kwargs == {"dtype": "float16", "clip_path": "/w/clip"}
    assert load_config(preset="sd14", sets=["reward_kwargs={dtype: null}"]).reward_kwargs == {}  # null removes a key
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("preset: sd14\nreward_kwargs: {clip_path: /a}\neval_rewards: [hpsv2]\n"
                         "eval_reward_kwargs: {hpsv2: {path: /h, dtype: float16}}\n")
    cfg = load_config(path=yaml_file, sets=["reward_kwargs={head_path: /b}", "eval_reward_kwargs={hpsv2: {path: /h2}}"])
    assert cfg.reward_kwargs == {"dtype": "float16", "clip_path": "/a", "head_path": "/b"}
    assert cfg.eval_reward_kwargs == {"hpsv2": {"path": "/h2", "dtype": "float16"}}
    assert Config.from_preset("sd14", reward_kwargs={"clip_path": "/c"}).reward_kwargs["dtype"] == "float16"


def test_set_preset_is_the_preset_it_records():
    """--set preset=sd14 without --preset used to run the demo values but record preset: sd14."""
    cfg = load_config(sets=["preset=sd14"])
    assert (cfg.preset, cfg.num_steps, cfg.reward) == ("sd14", 50, "aesthetic")
    assert load_config(preset="sd14", sets=["preset=sd14"]).preset == "sd14"
    with pytest.raises(ValueError, match="--preset demo and --set preset=sd14 disagree"):
        load_config(preset="demo", sets=["preset=sd14"])


def test_ddpo_grad_accum_refusal_says_which_values_work():
    with pytest.raises(ValueError) as e:
        load_config(preset="sd14", sets=["method=ddpo"])
    message = str(e.value)
    assert "grad_accum=9 must divide ddpo_minibatches=2" in message
    assert "grad_accum to 1 or 2" in message and "ddpo_rollout_batches=9 with ddpo_minibatches=9" in message
    for fix in (["grad_accum=2"], ["ddpo_rollout_batches=9", "ddpo_minibatches=9"]):  # the values it names work
        assert load_config(preset="sd14", sets=["method=ddpo", *fix]).method == "ddpo"
    with pytest.raises(ValueError, match="grad_accum to 1 or 2, or, keeping grad_accum=4, ddpo_minibatches=4 or 8 "
                                         "or 16 "):
        load_config(preset="sqdf", sets=["method=ddpo", "replay_capacity=0", "grad_accum=4",
                                         "ddpo_minibatches=2", "ddpo_rollout_batches=4"])


def test_notices_of_valid_but_easily_missed_settings():
    assert Config.from_preset("demo").notices() == []
    notes = Config.from_preset("demo", warmup_steps=50, train_steps=20).notices()
    assert len(notes) == 1 and "warmup_steps=50 > train_steps=20" in notes[0] and "0.4 x lr" in notes[0]
    schedule = {"a red circle on a blue background": [{"prompt": "a red circle", "from_step": 0, "to_step": 1}]}
    notes = Config.from_preset("demo", prompt_schedule=schedule).notices()
    assert len(notes) == 1 and "prompt schedule is active" in notes[0]


def test_every_declared_bound_is_enforced_in_one_line():
    """Bounds live with their fields (`option(..., low=, positive=)`); each one refuses a value past it."""
    bounded = [f for f in dataclasses.fields(Config) if f.metadata.get("low") is not None or f.metadata.get("positive")]
    assert {"num_steps", "h", "lr", "clip_range", "max_memory_gb"} <= {f.name for f in bounded}
    for f in bounded:
        bad = f.metadata["low"] - 1 if f.metadata.get("low") is not None else 0.0
        with pytest.raises(ValueError, match=rf"^{f.name} must be (>= {f.metadata.get('low')}|> 0), got"):
            Config.from_preset("demo", **{f.name: bad})


def test_an_option_the_method_ignores_is_refused_only_where_the_user_gave_it(tmp_path):
    """--set, finetune keywords and from_preset overrides are the user's: an estimator option the method does not
    read is a one-line error naming both. A preset's or a config file's value for another method (the demo preset's
    loo_prompt baseline, a run's config.yaml holding every key) is dropped: the estimate runs without it."""
    message = "baseline='value' is ignored by method='ddpo' (it is read by rlr, zo)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(sets=("method=ddpo", "baseline=value"))
    with pytest.raises(ValueError, match=re.escape(message)):
        Config.from_preset("demo", method="ddpo", baseline="value")
    with pytest.raises(ValueError, match=re.escape(message)):
        finetune(method="ddpo", baseline="value", out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    switched = load_config(sets=("method=ddpo",))
    assert switched.baseline == PRESETS["demo"]["baseline"] != "none"  # the preset's, kept in the Config ...
    assert switched.estimator_options().baseline == "none"  # ... and not read by DDPO's estimate
    dumped = tmp_path / "config.yaml"
    dumped.write_text(switched.to_yaml())
    assert load_config(path=dumped).method == "ddpo"  # a run's config.yaml (every key) loads again
    assert load_config(sets=("method=ddpo", "baseline=none")).method == "ddpo"  # the default is no conflict
