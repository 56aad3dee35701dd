"""The global model's non-trainable state (batch norm running statistics): how phones' reports merge.

Phones report the state their local training ended with (absolute values, protocol/FORMAT.md
section 11). The server's state after a merge is the example-weighted mean of the states reported
in it, the same weights FedAvg gives the parameters' deltas before staleness and robust rules: the
statistics of the union of the phones' data, as far as running averages allow. An integer tensor
(``num_batches_tracked``) takes the weighted mean rounded to the nearest integer. A merge in which no
phone reported state keeps the state as it was. Pure: numpy in, numpy out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = dict[str, np.ndarray]


def merge_state(current: Mapping[str, np.ndarray], reports: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> State:
    """``current`` with each tensor replaced by the mean of the reports' values weighted by their
    example counts (reports without state, or with no examples, take no part)."""
    taken = [(s, n) for s, n in reports if s and n > 0]
    if not taken:
        return {k: v.copy() for k, v in current.items()}
    weights = np.array([n for _, n in taken], dtype=np.float64)
    weights /= weights.sum()
    merged: State = {}
    for name, value in current.items():
        mean = sum(w * np.asarray(s[name], dtype=np.float64) for (s, _), w in zip(taken, weights, strict=True))
        mean = np.asarray(mean)
        merged[name] = np.rint(mean).astype(value.dtype) if value.dtype.kind in "iu" else mean.astype(value.dtype)
    return merged
