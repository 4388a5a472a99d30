"""bench/dcot.py --quick: every arm scores the same images, the schedule and the aim reach finetune,
the reward is the fine colour's, and the table, CSV and figure are written."""

import pytest
import torch

from bench import dcot  # the repository root is on sys.path: pyproject's pytest `pythonpath`


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcot")
    return dcot.main(["--quick", "--out", str(out)]), out


@pytest.mark.slow
def test_every_arm_scores_the_same_images_and_is_evaluated(quick):
    result, out = quick
    runs, settings = result["runs"], result["settings"]
    assert [r["arm"] for r in runs] == list(dcot.ARMS) * len(settings.seeds)
    scored = settings.train_steps * settings.base["batch_size"]
    assert all(r["images_scored"] == scored and len(r["train_reward"]) == settings.train_steps for r in runs)
    assert all(r["n"] == settings.eval_prompts * len(settings.eval_seeds) and 0 <= r["accuracy"] <= 1 for r in runs)
    assert [row["arm"] for row in result["rows"]][2:] == list(dcot.ARMS)
    table = (out / "dcot.md").read_text()
    assert all(f"| {arm} |" in table for arm in dcot.ARMS)
    assert len((out / "dcot.csv").read_text().splitlines()) == 1 + len(runs) and (out / "dcot.png").stat().st_size


def test_the_arms_set_the_schedule_and_the_aim():
    prompts = ["a red circle on a blue background"]
    plain, scheduled, aimed = (dcot.arm_keys(arm, dcot.QUICK, prompts) for arm in dcot.ARMS)
    assert "prompt_schedule" not in plain and "aim_steps" not in plain and "aim_steps" not in scheduled
    segments = scheduled["prompt_schedule"][prompts[0]]
    assert [s["prompt"] for s in segments] == [prompts[0], "a green circle on a blue background"]
    assert segments[1]["from_step"] == dcot.SWITCH and aimed["aim_steps"] == (dcot.SWITCH, 1.0)


def test_the_reward_is_the_fine_colour_of_the_centre():
    from rlr_fast.demo_data import COLORS

    prompt = "a red circle on a blue background"  # fine colour: green
    green = torch.tensor(COLORS["green"], dtype=torch.float32).div(255).reshape(1, 3, 1, 1).expand(1, 3, 16, 16)
    red = torch.tensor(COLORS["red"], dtype=torch.float32).div(255).reshape(1, 3, 1, 1).expand(1, 3, 16, 16)
    assert float(dcot.fine_colour_reward(green, [prompt])) == 0.0
    assert float(dcot.fine_colour_reward(red, [prompt])) < -0.1
    border = red.clone()
    border[:, :, 4:12, 4:12] = green[:, :, 4:12, 4:12]
    assert float(dcot.fine_colour_reward(border, [prompt])) == 0.0  # only the central half counts
