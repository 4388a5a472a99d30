"""metrics.jsonl (torn lines after a kill, TensorBoard mirror), the summary and the reward curve."""

import json
import math
import sys
import types

import pytest
from PIL import Image

from rlr_fast.metrics import MetricsLog, draw_reward_curve, jsonable, read_metrics, summarize


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1])


def test_a_torn_last_line_is_dropped_with_a_note(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, ['{"step": 1}', '{"step": 2}', '{"step": 3, "reward_me'])
    assert read_metrics(path, keep_until=5) == [{"step": 1}, {"step": 2}]
    assert "dropped the torn last line of" in capsys.readouterr().err
    assert read_metrics(path, keep_until=1) == [{"step": 1}]  # steps after the checkpoint go too


def test_a_damaged_line_before_the_last_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, ['{"step": 1}', '{"ste', '{"step": 3}'])
    with pytest.raises(ValueError, match=rf"{path} line 2 is not JSON"):
        read_metrics(path, keep_until=5)


def test_log_starts_with_the_kept_records_and_appends(tmp_path):
    log = MetricsLog(tmp_path, [{"step": 1}], tensorboard=False)
    log.write({"step": 2, "reward_mean": 0.5})
    log.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1}, {"step": 2, "reward_mean": 0.5}]


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    """With tensorboard importable, every numeric metric also goes to a SummaryWriter."""
    written = []

    class FakeWriter:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path, [], tensorboard=True)
    log.write({"step": 3, "reward_mean": 0.5, "skipped": False, "estimator": {"j": 1}})
    log.close()
    assert written == [("dir", str(tmp_path / "tensorboard")), ("reward_mean", 0.5, 3), ("closed",)]


def test_summary_compares_the_first_and_last_fifth():
    # 10 steps: the first fifth has rewards 0 and 2, the last fifth 10 and 14
    means = [0, 2, 5, 5, 5, 5, 5, 5, 10, 14]
    records = [{"step": i + 1, "reward_mean": m, "skipped": False} for i, m in enumerate(means)]
    records.append({"step": 11, "reward_mean": None, "skipped": "reward"})
    summary = summarize(records, seconds=3.0)
    assert summary["steps"] == 11 and summary["nonfinite_skipped"] == 1 and summary["last"]["step"] == 11
    assert summary["reward_first_fifth"] == 1 and summary["reward_last_fifth"] == 12 and summary["reward_gain"] == 11
    assert summary["reward_gain_stderr"] == pytest.approx(math.sqrt(2 / 2 + 8 / 2))  # sample variances 2 and 8


def test_jsonable_turns_nan_into_null():
    assert json.dumps(jsonable({"a": float("nan"), "b": (1, 2.5)})) == '{"a": null, "b": [1, 2.5]}'


def test_reward_curve_is_a_png_of_the_given_size(tmp_path):
    records = [{"step": s, "reward_mean": s * 0.1, "reward_std": 0.05} for s in range(1, 6)]
    path = draw_reward_curve(records + [{"step": 6, "reward_mean": None}], tmp_path / "curve.png", size=(300, 200))
    assert Image.open(path).size == (300, 200) and sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
