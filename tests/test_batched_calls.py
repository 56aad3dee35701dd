"""Narrower calls for phones at a partial batch (``batched_calls``): the split itself, and
``train_many`` split at every change of width equal to the per-phone loop in float64."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedfleet.device_runtime.batched import train_many
from fedfleet.device_runtime.batched_calls import rows_per_call, split_step
from tests.test_batched_state import CFG, SIZES, assert_same, float64_model, make_jobs, per_phone
from tests.test_batched_state import one_thread as one_thread  # autouse: one torch thread here too


def test_split_step_cuts_where_it_saves_more_rows_than_a_call_costs() -> None:
    rows = np.array([16, 16, 16, 4, 4, 4, 4, 4, 4, 4, 4, 1])
    assert split_step(rows, 10**6) == [(0, 12, 16)]  # a call costs more than any saving
    # 9 phones at 4 rows save 9 * 12 = 108 rows against a call of 50: cut; the last phone saves 3 more
    # rows than it would at width 4, less than a call
    assert split_step(rows, 50) == [(0, 3, 16), (3, 12, 4)]
    assert split_step(rows, 0) == [(0, 3, 16), (3, 11, 4), (11, 12, 1)]


def test_split_step_covers_every_phone_at_its_widest() -> None:
    """Rows need not fall along the chunk (several local epochs: a partial batch mid-training);
    every call is as wide as its widest phone, and the calls tile the step."""
    rows = np.array([8, 3, 8, 8, 2, 7])
    for cost in (0, 3, 10**6):
        calls = split_step(rows, cost)
        assert [lo for lo, _, _ in calls] == [0, *(hi for _, hi, _ in calls[:-1])] and calls[-1][1] == len(rows)
        assert all(width == rows[lo:hi].max() for lo, hi, width in calls)


@pytest.mark.parametrize("call_rows", [0, 5, 10**9])
def test_train_many_split_at_any_cost_equals_per_phone_in_float64(digits: Any, call_rows: int) -> None:
    """Two local epochs in batches of 8 with partial batches mid-training; phones at different
    widths in one step (call_rows 0: a call per width)."""
    model, params = float64_model(0.3)
    x = digits.x_train.astype(np.float64)
    got = train_many(model, params, make_jobs(x, digits.y_train, 3), CFG, chunk=8, dtype=torch.float64,
                     call_rows=call_rows)
    want = per_phone(model, params, make_jobs(x, digits.y_train, 3), CFG, [{}] * len(SIZES))
    assert_same(got, want, atol=1e-10)


def test_rows_per_call_is_fewer_for_heavier_models(digits: Any) -> None:
    """The call's fixed cost in rows: a wider convolution's rows cost more, so fewer of them make a call."""
    example = torch.as_tensor(digits.x_train[:1])
    narrow = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(128, 10))
    wide = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.Flatten(), nn.Linear(4096, 10))
    assert rows_per_call(wide, example) < rows_per_call(narrow, example)
    assert not any(m.training is False for m in wide.modules())  # left in train mode
