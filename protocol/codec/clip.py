"""Step 1: norm clipping, which bounds each phone's influence (the DP sensitivity C).

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
Models") clips the whole update to L2 norm C; per-layer clipping (ibid., section 3)
splits the bound so that the whole update still has norm <= C, which keeps the noise
calibration unchanged: C_l = C / sqrt(L) for L2 (sum of C_l**2 = C**2), C / L for L1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfleet.protocol.codec.types import Update


def update_norm(update: Update, ord: int = 2) -> float:
    """L1 or L2 norm of all tensors taken together, in float64."""
    if ord == 1:
        return float(sum(np.abs(a).sum() for a in update.values()))
    return math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in update.values()))


def _scaled(update: Update, bound: float, ord: int) -> Update:
    norm = update_norm(update, ord)
    if norm <= bound:
        return update
    factor = bound / norm
    return {name: a * factor for name, a in update.items()}


@dataclass(frozen=True)
class Clip:
    bound: float  # C
    per_layer: bool = False
    ord: int = 2

    def __call__(self, update: Update, rng: np.random.Generator) -> Update:
        if not self.per_layer:
            return _scaled(update, self.bound, self.ord)
        layers = max(len(update), 1)
        share = self.bound / (math.sqrt(layers) if self.ord == 2 else layers)
        out: Update = {}
        for name, a in update.items():
            out.update(_scaled({name: a}, share, self.ord))
        return out
