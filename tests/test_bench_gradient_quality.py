"""Smoke test of bench/gradient_quality.py: its --quick run, whose table must still tell a biased
estimator from unbiased ones, the one-step sweep's memory from the one-graph backprop's, and count
the value baseline's reward calls in its cost."""

import pytest

from bench import gradient_quality  # the repository root is on sys.path: pyproject's pytest `pythonpath`

COLUMNS = ["setting", "T", "B", "N", "estimator", "bias_max_abs_z", "trace_var", "cos_mean_to_exact",
           "mean_cos_single", "model_fwd", "model_bwd", "unet_steps", "reward_fwd", "reward_bwd", "value_fallbacks",
           "cost_fwd_eq", "var_x_cost", "cost_sd14", "var_x_cost_sd14", "peak_saved_bytes", "sec_per_estimate"]


@pytest.mark.slow
def test_quick_run_table():
    rows = gradient_quality.main(["--quick"])
    assert list(dict.fromkeys(k for row in rows for k in row)) == COLUMNS  # write_results' column order
    table = {(row["setting"], row["estimator"]): row for row in rows}
    expected = [label for label, _, _ in gradient_quality.ESTIMATORS] + ["naive_backprop (one graph)"]
    for setting in ("toy SD1.4", "toy TOY_SCHEDULE", "unet"):
        assert [e for s, e in table if s == setting] == expected
    assert [e for s, e in table if s == "toy SD1.4 trailing T=6"] == [
        label for label, _, _ in gradient_quality.BY_BASELINE]
    for setting in ("toy SD1.4", "toy TOY_SCHEDULE"):  # exact gradient in closed form, N = 40
        assert table[setting, "full_bp"]["bias_max_abs_z"] < 4
        assert table[setting, "rlr h=2 loo"]["bias_max_abs_z"] < 4
        assert table[setting, "zo value (running fit)"]["bias_max_abs_z"] < 4
        assert table[setting, "truncated_bp k=1"]["bias_max_abs_z"] > 40
        assert table[setting, "ddpo"]["bias_max_abs_z"] is None  # another objective's scale: cosines only
        assert table[setting, "sqdf alpha=0 gamma=1"]["bias_max_abs_z"] is None  # so is sqdf's soft-Q step
    unet = {e: row for (s, e), row in table.items() if s == "unet"}
    # one step resident: RLR's peak is full_bp's, and the one-graph backprop holds all T = 5 steps
    assert unet["rlr h=2 loo"]["peak_saved_bytes"] <= 1.1 * unet["full_bp"]["peak_saved_bytes"]
    assert unet["naive_backprop (one graph)"]["peak_saved_bytes"] > 3 * unet["full_bp"]["peak_saved_bytes"]
    assert unet["full_bp"]["model_fwd"] == unet["full_bp"]["model_bwd"] == unet["full_bp"]["unet_steps"] == 5
    # T = 5, eta = 1: zo scores x0_hat of all 5 steps on top of R(x0), and prices them on SD1.4
    zo_value = unet["zo value (loo fit)"]
    assert zo_value["reward_fwd"] == 1 + 5 and zo_value["reward_bwd"] == 0 and zo_value["value_fallbacks"] == 0
    assert zo_value["cost_fwd_eq"] == unet["zo loo"]["cost_fwd_eq"] == pytest.approx(5 + 2.15 * 5)
    per_call = gradient_quality.sd14_reward_call_cost()
    assert zo_value["cost_sd14"] - unet["zo loo"]["cost_sd14"] == pytest.approx(5 * per_call)
    assert unet["full_bp"]["cost_sd14"] == pytest.approx(5 + 2.15 * 5 + per_call * (1 + 2))
    # sqdf: one UNet step resident too, in 5 forwards and 2 backwards whatever T
    assert unet["sqdf alpha=0 gamma=1"]["peak_saved_bytes"] <= 1.1 * unet["full_bp"]["peak_saved_bytes"]
    assert (unet["sqdf alpha=0 gamma=1"]["model_fwd"], unet["sqdf alpha=0 gamma=1"]["model_bwd"]) == (5, 2)
    assert all(row["sec_per_estimate"] > 0 for row in rows)
