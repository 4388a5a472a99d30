"""Smoke test of bench/design_quality.py: its --quick run measures a choice against the grid's best."""

from bench import design_quality  # the repository root is on sys.path: pyproject's pytest `pythonpath`


def test_quick_run_rows():
    rows = design_quality.main(["--quick"])
    assert [(r["schedule"], r["budget"]) for r in rows] == [
        (s, b) for s in design_quality.SCHEDULES for b in ("11.3 (2 steps)", "none")]
    for row in rows:
        assert 1 - 1e-12 <= row["ratio_median"] <= row["ratio_max"]  # no design beats the grid's best
        assert 0 <= row["share_above_1_2"] <= 1
        assert row["design_forward_equivalents"] > 3 * row["T"] and row["design_seconds"] > 0
