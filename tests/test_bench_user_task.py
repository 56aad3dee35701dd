"""The user-task benchmark compares like with like: the GRU's digits are mnist5k's (same split, rows of
the same images), and its table's gap, goal and verdict follow from the runs it is given."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_user_task import TASKS, compare, converged, parse_args, plan_of
from examples.custom_task import mnist5k_rows
from fedfleet.device_runtime.data import load_dataset


def test_mnist5k_rows_are_the_mnist5k_split_as_28_rows_of_28_features() -> None:
    x, y, xt, yt = mnist5k_rows(seed=3)
    images = load_dataset("mnist5k", seed=3)
    assert x.shape[1:] == (28, 28) and xt.shape[1:] == (28, 28)
    np.testing.assert_array_equal(x, images.x_train[:, 0])
    np.testing.assert_array_equal(xt, images.x_test[:, 0])
    np.testing.assert_array_equal(y, images.y_train)
    np.testing.assert_array_equal(yt, images.y_test)


def test_the_table_gives_the_gap_in_points_against_each_goal_and_the_mean_over_seeds() -> None:
    accuracy = {("BN CNN", 0): (0.96, 0.93), ("BN CNN", 1): (0.95, 0.89), ("GRU", 0): (0.90, 0.77)}
    runs = [{"model": m, "seed": s, "kind": kind, "accuracy": acc}
            for (m, s), pair in accuracy.items() for kind, acc in zip(("central", "federated"), pair, strict=True)]
    rows = {(r["model"], r["seed"]): r for r in compare(runs)}
    assert set(rows) == {("BN CNN", "0"), ("BN CNN", "1"), ("BN CNN", "mean"), ("GRU", "0")}
    assert rows[("BN CNN", "0")]["gap_points"] == pytest.approx(3.0) and rows[("BN CNN", "0")]["met"] == "yes"
    assert rows[("BN CNN", "1")]["gap_points"] == pytest.approx(6.0) and rows[("BN CNN", "1")]["met"] == "no"
    assert rows[("BN CNN", "mean")]["central"] == pytest.approx(0.955)
    assert rows[("BN CNN", "mean")]["gap_points"] == pytest.approx(4.5)
    assert rows[("GRU", "0")]["goal_points"] == TASKS["GRU"].goal_points == 12.0
    assert rows[("GRU", "0")]["met"] == "no"  # 13 points off


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--seeds", "0,1,2", "--local-epochs", "3"]).seed_list == [0, 1, 2]
    for argv in (["--seeds", "0,x"], ["--lr", "0"], ["--only", "LSTM"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 2
    assert "--seeds: comma-separated integers, got '0,x'" in capsys.readouterr().err


def test_central_training_stops_once_patience_epochs_bring_no_better_accuracy() -> None:
    assert not converged([], 2) and not converged([0.5, 0.6], 2)  # too few epochs to tell
    assert not converged([0.5, 0.6, 0.59, 0.61], 2)  # the last two beat 0.6
    assert converged([0.5, 0.6, 0.59, 0.6], 2)  # equal is not better
    assert converged([0.5, 0.6, 0.59, 0.58, 0.7], 3) is False and converged([0.9, 0.5, 0.6, 0.7], 3)


def test_each_task_has_its_own_plan_and_the_flags_override_it_for_every_task() -> None:
    default = parse_args([])
    assert plan_of("GRU", default) == TASKS["GRU"].plan != TASKS["BN CNN"].plan == plan_of("BN CNN", default)
    tuned = parse_args(["--lr", "0.3", "--server-optimizer", "fedadam"])
    for name in TASKS:
        plan = plan_of(name, tuned)
        assert (plan.lr, plan.server_optimizer) == (0.3, "fedadam")
        assert plan.batch_size == TASKS[name].plan.batch_size
