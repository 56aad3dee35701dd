"""A strategy of one's own: the coordinate-wise median of the updates (Yin et al. 2018).

    PYTHONPATH=examples fedfleet simulate --phones 20 --rounds 5 --strategy median_strategy:CoordinateMedian

Each coordinate of the new model is the old one plus the median of the phones' deltas at that
coordinate: a few phones sending garbage cannot drag it far, whatever their claimed example
counts (the median ignores weights). See docs/strategies.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedfleet.server.strategy import MergeContext, MergeResult, Params, Strategy, Update


class CoordinateMedian(Strategy):
    def aggregate(self, params: Params, state: Params, updates: Sequence[Update], ctx: MergeContext) -> MergeResult:
        new = {}
        for name, p in params.items():
            median = np.median(np.stack([u.delta[name] for u in updates]), axis=0)  # [*p.shape], float64
            new[name] = (p + median).astype(p.dtype)
        return MergeResult(new, state={}, metrics={"median_of": len(updates)})
