"""bench/sample_efficiency.py --quick: both tracks, every method within the same budget of images scored,
UNet work per image as rlr_fast.costs says, DDPO's epochs on-policy first, and the table, the CSV and
the goal line agree with each other."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from bench import sample_efficiency as se  # the repository root is on sys.path: pyproject's pytest `pythonpath`
from rlr_fast.config import Config
from rlr_fast.costs import work

pytestmark = pytest.mark.slow  # 34 short finetune runs: minutes on 2 cores


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_efficiency")
    return se.main(["--quick", "--out", str(out)]), out


def test_every_method_spends_the_budget_in_images_scored(quick):
    result, _ = quick
    study = result["study"]
    s = study.settings
    for (track, label), runs in study.runs.items():
        keys = dict(s.base, **se.TRACKS[track].methods[label])
        cycle, _ = se.images_per_step(keys)
        for run in runs:
            spent = sum(r["reward_images"] for r in run.records)  # auto's pilots included
            assert s.budget - cycle < spent <= s.budget, (label, spent)
            assert run.eval_mean is not None and np.isfinite(run.eval_mean)
    assert [r.seed for r in study.runs[("black-box", "zo (loo)")]] == list(s.figure_seeds)


def test_unet_work_per_image_is_the_cost_models(quick):
    """Counted by the training loop (sample-steps) against rlr_fast.costs.work: per sample, the rollout's
    T forwards and each recomputed step a forward and a backward (`backward_cost` forwards), over the
    images the estimate scores (the value baseline's proxies multiply them)."""
    result, _ = quick
    study = result["study"]
    c, s = study.backward_cost, study.settings
    assert 0.5 < c < 1.5  # LoRA-only weight gradients: cheaper than the classic 2x
    for track in s.tracks:
        rows = {r["method"]: r for r in result["summaries"][track][0]}
        for label, keys in se.TRACKS[track].methods.items():
            if keys["method"] not in ("rlr", "zo", "full_bp") or label not in rows:
                continue
            w = work(Config(**dict(s.base, **keys)).estimator_options(), s.base["num_steps"])
            expected = (w.rollout + w.recomputed * (1 + c) + w.forwards) / w.reward_images
            assert rows[label]["unet_fwd_equiv_per_image"] == pytest.approx(expected, rel=1e-9), label


def test_ddpo_epochs_start_on_policy(quick):
    study = quick[0]["study"]
    for key, runs in study.runs.items():
        if se.TRACKS[key[0]].methods[key[1]]["method"] != "ddpo":
            continue
        for run in runs:
            first = [r for r in run.records if r["reward_images"]]
            assert first and all(r["estimator"]["ratio_max_deviation"] == 0 for r in first)  # ratio 1 exactly


def test_auto_is_labelled_with_its_design(quick):
    rows = quick[0]["summaries"]["differentiable"][0]
    assert any(r["method"].startswith("auto (chose ") for r in rows)


def test_lr_grid_extends_past_a_best_edge():
    assert se.next_lrs({1e-3: -1.0, 1e-2: -0.5}, 0, 2) == [3e-2]
    assert se.next_lrs({1e-3: -0.4, 1e-2: -0.5}, 0, 2) == [1e-3 / 3]
    assert se.next_lrs({1e-3: -0.6, 3e-3: -0.4, 1e-2: -0.5}, 0, 2) == []  # interior
    assert se.next_lrs({1e-3: -1.0, 1e-2: -0.5}, 2, 2) == []  # extensions spent


def test_table_csv_and_goal_agree(quick):
    result, out = quick
    study = result["study"]
    with (out / "sample_efficiency.csv").open() as f:
        points = list(csv.DictReader(f))
    text = (out / "sample_efficiency.md").read_text()
    for track, (rows, _, goal) in result["summaries"].items():
        for row, label in zip(rows, se.TRACKS[track].methods):
            mine = [p for p in points if p["track"] == track and p["method"] == label]
            finals = [float(p["reward"]) for p in mine if int(p["images"]) == study.settings.budget]
            assert row["final_reward"] == pytest.approx(np.mean(finals), abs=1e-5)  # the CSV keeps 6 digits
        ddpo = next(r for r in rows if r["method"].startswith("ddpo"))
        assert goal["ddpo_final"] == pytest.approx(ddpo["final_reward"])
        assert ddpo["images_to_ddpo_final"] is not None  # its own final, reached by the end at the latest
        best = next(r for r in rows if r["method"] == goal["best_rlr"])
        assert goal["best_rlr_images"] == best["images_to_ddpo_final"]
        for row, label in zip(rows, se.TRACKS[track].methods):  # none reaches sooner, nor as soon and higher
            if se.unbiased_rlr(se.TRACKS[track].methods[label]) and row["images_to_ddpo_final"] is not None:
                assert best["images_to_ddpo_final"] is not None
                assert ((best["images_to_ddpo_final"], -best["final_reward"])
                        <= (row["images_to_ddpo_final"], -row["final_reward"]))
        assert goal["met"] == (goal["half"] and best["final_reward"] > goal["ddpo_final"])
        assert se.goal_line(goal) in text
    assert "Device: CPU" in text and "Load average" in text and "CPU min" in text
    with Image.open(out / "sample_efficiency.png") as png:
        assert png.width > 6 * 400 and png.height > 300  # three panels per track, side by side


def test_the_long_budget_runs_each_tracks_contest_against_ddpo():
    long, tuning = se.LONG.figures(), se.LONG
    assert tuning.budget == se.FULL.budget and long.budget >= 5 * tuning.budget  # ~1000 images, lrs tuned at 192 first
    assert long.extensions == se.FULL.extensions > 0  # the long grid is extended like the short one
    for track in se.TRACKS:
        methods = {se.TRACKS[track].methods[label]["method"] for t, label in tuning.methods if t == track}
        assert {"ddpo", "rlr"} <= methods, track
    assert ("differentiable", "full_bp") in tuning.methods
    ddpo = dict(tuning.base, **se.DDPO)
    images, steps = se.images_per_step(ddpo)
    epochs = se.steps_for(ddpo, long.budget) // steps
    assert epochs >= 20 and epochs * images // 16 >= 4 * se.DDPO["ddpo_min_count"]  # statistics on, many epochs


def test_a_cached_run_is_read_only_at_its_own_budget(tmp_path):
    """A run cached at one budget is not the same run at another (the long runs share the cache with the short)."""
    fake = se.RunResult("black-box", "zo (loo)", 0.01, 0, [{"reward_images": 8}], 1.0, 1.0)
    other = replace(se.QUICK, budget=se.QUICK.budget + 8)
    (tmp_path / f"black-box|zo (loo)|0.01|0|False|{other.budget}.json").write_text(json.dumps(fake.to_json()))
    assert se.run_one(("black-box", "zo (loo)", 0.01, 0, other, False, tmp_path)) == fake
    ran = se.run_one(("black-box", "zo (loo)", 0.01, 0, se.QUICK, False, tmp_path))  # a real run, a few seconds
    assert ran != fake and sum(r["reward_images"] for r in ran.records) <= se.QUICK.budget
    assert (tmp_path / f"black-box|zo (loo)|0.01|0|False|{se.QUICK.budget}.json").exists()


def test_the_long_budget_is_tuned_again_from_the_short_choice(tmp_path):
    """--long's protocol on tiny sizes: the short grid at `budget`, then the short choice and a third of it
    at `figure_budget` on the tuning seeds, extended once past a best edge, the figures at the best."""
    s = replace(se.QUICK, lrs=(3e-3, 3e-2), tune_seeds=(100,), figure_seeds=(0,), figure_budget=48, figure_bin=8,
                tracks=("black-box",), methods=(("black-box", "zo (loo)"),), extensions=1)
    study = se.run_study(s, tmp_path)
    key = ("black-box", "zo (loo)")
    short = study.short_tuning[key]
    choice = max(short, key=short.get)
    assert set(short) >= set(s.lrs)
    scores = study.tuning[key]
    low, high = (min(scores, key=lambda lr: abs(lr - x)) for x in (choice / 3, choice))
    assert low == pytest.approx(choice / 3) and high == pytest.approx(choice)
    beyond = low / 3 if scores[low] > scores[high] else high * 3  # one extension past the better of the two
    assert sorted(scores) == pytest.approx(sorted([low, high, beyond]))
    assert study.chosen[key] == max(study.tuning[key], key=study.tuning[key].get)
    cached = {p.name.split("|")[-1] for p in tmp_path.iterdir()}
    assert cached == {"32.json", "48.json"}  # tuning at both budgets, figures at the long one
    (run,) = study.runs[key]
    assert run.lr == study.chosen[key] and sum(r["reward_images"] for r in run.records) == 48
