"""Pure aggregation: numpy in, numpy out. No clock, logging or network."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

Params = dict[str, np.ndarray]
_CHUNK = 1 << 16  # float64 elements per stacked chunk of rows (512 KiB: stays in cache)


def stacked_rows(tensors: Sequence[Any]) -> Iterator[tuple[int, np.ndarray]]:
    """(i, rows): rows[r] = float64(ravel(tensors[i + r])), about ``_CHUNK`` elements at a time;
    one reused buffer, so consume each before taking the next. One np.concatenate per chunk
    instead of a numpy call per tensor, and a chunk that stays in cache while it is used."""
    shape = np.shape(tensors[0])
    size = int(np.prod(shape))
    step = max(1, _CHUNK // max(size, 1))
    buf = np.empty(min(step, len(tensors)) * size)
    for i in range(0, len(tensors), step):
        part = tensors[i : i + step]
        rows = buf[: len(part) * size]
        if shape:  # joined along their first axis: no reshaped view per tensor
            np.concatenate(part, out=rows.reshape(len(part) * shape[0], *shape[1:]))
        else:
            rows[:] = part
        yield i, rows.reshape(len(part), size)


def weighted_mean(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """FedAvg (McMahan et al. 2017): sum_i w_i * u_i / sum_i w_i, accumulated in float64.

    The updates are stacked a chunk of rows at a time and summed along the rows: the additions
    of a loop over the updates, in its order, so the same bits as that loop."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    total = float(sum(w for _, w in updates))
    if not total > 0:
        raise ValueError("aggregation weights must sum to a positive number")
    coef = np.array([w / total for _, w in updates], dtype=np.float64)
    out: Params = {}
    for name, first in updates[0][0].items():
        acc = np.zeros(np.size(first))
        for i, rows in stacked_rows([u[name] for u, _ in updates]):
            rows *= coef[i : i + len(rows), None]
            rows[0] += acc
            # along axis 0 numpy adds row after row; a single column it would sum pairwise
            acc = np.add.reduce(rows, axis=0) if rows.shape[1] != 1 else np.cumsum(rows, axis=0)[-1]
        out[name] = acc.reshape(np.shape(first))
    return out


def example_weight(num_examples: int, cap: int) -> float:
    """An update weighs its example count, capped so that no phone dominates a round."""
    return float(min(num_examples, cap))
