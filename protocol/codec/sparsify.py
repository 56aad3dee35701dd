"""Step 3: sparsification, per tensor: keep k of n entries and send them with their indices.

* ``TopK`` keeps the k largest |x| (Aji & Heafield, 2017; Stich et al., 2018, "Sparsified
  SGD with Memory"). It is biased, which error feedback repairs (``feedback.py``).
  Ties go to the lower index so the choice is the same in every language.
* ``RandK`` keeps k uniformly random entries; scaled by n/k each entry is sent with
  probability k/n at n/k times its value, so the send is unbiased (Stich et al., 2018;
  Konecny et al., 2016, "Federated Learning: Strategies for Improving Communication
  Efficiency").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.protocol.codec.types import Pick, Update


def keep_count(n: int, density: float | None, k: int | None) -> int:
    """k = min(k, n), or max(1, floor(density * n + 1/2)) capped at n (0 if n == 0)."""
    if n == 0:
        return 0
    if k is not None:
        return min(k, n)
    assert density is not None
    return min(n, max(1, int(np.floor(density * n + 0.5))))


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |values|; among equal magnitudes, lower index first."""
    n = values.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    mag = np.abs(values)
    threshold = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


@dataclass(frozen=True)
class TopK:
    density: float | None = None
    k: int | None = None

    def __call__(self, update: Update, rng: np.random.Generator) -> dict[str, Pick]:
        picks: dict[str, Pick] = {}
        for name, a in update.items():
            flat = a.ravel()
            idx = top_k_indices(flat, keep_count(flat.size, self.density, self.k))
            picks[name] = Pick(idx, flat[idx])
        return picks


@dataclass(frozen=True)
class RandK:
    density: float | None = None
    k: int | None = None
    rescale: bool = True

    def __call__(self, update: Update, rng: np.random.Generator) -> dict[str, Pick]:
        picks: dict[str, Pick] = {}
        for name, a in update.items():
            flat = a.ravel()
            k = keep_count(flat.size, self.density, self.k)
            idx = np.sort(rng.choice(flat.size, size=k, replace=False)).astype(np.int64)
            values = flat[idx] * (flat.size / k) if self.rescale and k else flat[idx]
            picks[name] = Pick(idx, values)
        return picks


def keep_all(update: Update) -> dict[str, Pick]:
    """No sparsifier: every tensor goes dense."""
    return {name: Pick(None, a.ravel()) for name, a in update.items()}
