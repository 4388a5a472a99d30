"""bench/sample_efficiency.py --quick: every method runs on the same budget of reward queries, its
UNet work per query is what docs/estimator.md §7 says it costs, DDPO's later steps clip, and the
table, the CSV and the goal line agree with each other."""

import csv

import numpy as np
import pytest
from PIL import Image

from bench import sample_efficiency  # the repository root is on sys.path: pyproject's pytest `pythonpath`


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_efficiency")
    return sample_efficiency.main(["--quick", "--out", str(out)]), out


def test_every_method_spends_the_same_budget(quick):
    result, _ = quick
    study = result["study"]
    settings = study.settings
    assert [r["method"] for r in result["rows"]] == [m.label for m in study.methods]
    for method in study.methods:
        runs = study.runs[method.label]
        assert [r.seed for r in runs] == list(settings.figure_seeds)
        for run in runs:
            # method=auto's design pilots are scored too, and counted in its budget
            assert sum(r["reward_queries"] + r.get("design_reward_queries", 0) for r in run.records) == settings.budget
            assert run.eval_mean is not None and np.isfinite(run.eval_mean)


def test_unet_work_per_query_is_the_methods_cost(quick):
    """Per sampled image: T rollout forwards, then each recomputed step one forward and one backward
    (a backward is `backward_cost` forwards)."""
    result, _ = quick
    T, c = result["study"].settings.base["num_steps"], result["study"].backward_cost
    assert 0.5 < c < 1.5  # LoRA-only weight gradients: cheaper than the classic 2x
    per_query = {r["method"]: r["unet_fwd_equiv_per_query"] for r in result["rows"]}
    every_step = T + T * (1 + c)
    for label in ("rlr (f=1, h=2, uniform j, loo)", "zo (loo)", "ddpo", "full_bp"):
        assert per_query[label] == pytest.approx(every_step, rel=1e-9), label
    assert per_query["draft-1"] == pytest.approx(T + 1 + c, rel=1e-9)
    assert T + 1 + c - 1e-9 <= per_query["alignprop (random K)"] <= every_step + 1e-9


def test_ddpo_steps_after_an_epochs_first_are_clipped(quick):
    rows = {r["method"]: r for r in quick[0]["rows"]}
    assert rows["ddpo"]["clip_fraction_off_policy"] > 0
    assert all(r["clip_fraction_off_policy"] is None for label, r in rows.items() if label != "ddpo")


def test_table_csv_and_goal_agree(quick):
    result, out = quick
    rows, goal, study = result["rows"], result["goal"], result["study"]
    settings = study.settings
    with (out / "sample_efficiency.csv").open() as f:
        points = list(csv.DictReader(f))
    window = goal["window"]
    for row in rows:
        mine = [p for p in points if p["method"] == row["method"]]
        per_seed = {}
        for p in mine:
            per_seed.setdefault(p["seed"], []).append(float(p["reward"]))
        finals = [np.mean(v[-window:]) for v in per_seed.values()]
        assert row["final_reward"] == pytest.approx(np.mean(finals), abs=1e-5)  # the CSV keeps 6 digits
        queries = sorted({int(p["queries"]) for p in mine})
        design = study.runs[row["method"]][0].records[0].get("design_reward_queries", 0)  # auto's pilots come first
        assert queries == list(range(design + settings.bin, settings.budget + 1, settings.bin))
        for key in ("queries_to_ddpo_final", "queries_to_90pct_full_bp_gain"):
            assert row[key] is None or row[key] in queries
    ddpo = next(r for r in rows if r["method"] == "ddpo")
    assert goal["ddpo_final"] == pytest.approx(ddpo["final_reward"])
    assert ddpo["queries_to_ddpo_final"] is not None  # its own final, reached by the end at the latest
    best = next(r for r in rows if r["method"] == goal["best_rlr"])
    assert goal["best_rlr_queries"] == best["queries_to_ddpo_final"]
    assert goal["met"] == (best["queries_to_ddpo_final"] is not None and 3 * best["queries_to_ddpo_final"]
                           <= settings.budget)
    text = (out / "sample_efficiency.md").read_text()
    assert "Device: CPU" in text and "Load average" in text and f"Best RLR variant: {goal['best_rlr']}" in text
    with Image.open(out / "sample_efficiency.png") as png:
        assert png.width > 3 * 400 and png.height > 300  # three panels side by side
