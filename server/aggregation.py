"""Pure aggregation: numpy in, numpy out. No clock, logging or network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = dict[str, np.ndarray]


def weighted_mean(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """FedAvg (McMahan et al. 2017): sum_i w_i * u_i / sum_i w_i, accumulated in float64."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    total = float(sum(w for _, w in updates))
    if not total > 0:
        raise ValueError("aggregation weights must sum to a positive number")
    names = list(updates[0][0])
    out: Params = {}
    for name in names:
        acc = np.zeros(np.shape(updates[0][0][name]), dtype=np.float64)
        for upd, w in updates:
            acc += (w / total) * np.asarray(upd[name], dtype=np.float64)
        out[name] = acc
    return out


def example_weight(num_examples: int, cap: int) -> float:
    """An update weighs its example count, capped so that no phone dominates a round."""
    return float(min(num_examples, cap))


def apply_delta(params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], server_lr: float) -> Params:
    """new = params + server_lr * delta, kept in the parameters' dtype."""
    return {
        n: (p.astype(np.float64) + server_lr * delta[n]).astype(p.dtype) for n, p in params.items()
    }
