"""Shared shapes of data between the encoder's steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# name -> float64 array of the tensor's shape; every dense step maps Update -> Update
Update = dict[str, np.ndarray]


class DenseStep(Protocol):
    """A step on the whole update (clip, noise). Steps draw randomness only from ``rng``."""

    def __call__(self, update: Update, rng: np.random.Generator) -> Update: ...


@dataclass(frozen=True)
class Pick:
    """What a sparsifier keeps of one tensor: sorted flat ``indices`` (None: all of it)
    and the float64 ``values`` to send at them, in index order."""

    indices: np.ndarray | None
    values: np.ndarray
