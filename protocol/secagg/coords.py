"""Shared random-k for secure rounds: every phone of a group sends the same k of the model's
D coordinates, drawn from the group's seed, so the masked sum stays a sum coordinate by
coordinate (top-k, each phone keeping its own largest coordinates, would reveal them).

The draw is portable: the indices 0..D-1 sorted by (PRG word i, i), the PRG being the mask PRG
(FORMAT.md 12.2) keyed by HKDF(graph_seed, "coordinates", group), and the first k kept, in
increasing order. The server scales the unmasked mean by D / k, like the codec's rand-k
(unbiased). Pure.
"""

from __future__ import annotations

import math

import numpy as np

from fedfleet.protocol.secagg import crypto


def kept(full_dim: int, density: float) -> int:
    """k = max(1, floor(density * D + 1/2)), as the codec's rand-k."""
    return max(1, min(full_dim, math.floor(density * full_dim + 0.5)))


def shared_coordinates(graph_seed: bytes, group: bytes, full_dim: int, k: int) -> np.ndarray:
    """The k coordinates (int64, increasing) all phones of the group send."""
    if k >= full_dim:
        return np.arange(full_dim, dtype=np.int64)
    words = crypto.prg_words(crypto.hkdf(graph_seed, "coordinates", group), full_dim)
    order = np.lexsort((np.arange(full_dim), words))  # by word, then by index
    return np.sort(order[:k]).astype(np.int64)
