"""Prompt schedules: parsing, which step gets which prompt, the distinct-text table, and bad schedules."""

import pytest
import torch
import yaml

from rlr_fast.prompts import PromptSchedule, PromptSteps, Segment, step_conditioning

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
    with pytest.raises(ValueError, match="not in the prompt"):
        PromptSteps(["a red circle on a white background"], THREE, num_steps=10)
