"""The random rotation of secure rounds (Kairouz, Liu and Steinke, 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", section 4): before
an update becomes integers it is padded, sign-flipped, permuted and multiplied by a block
Walsh-Hadamard matrix, all drawn from the group's seed, so every phone of the group applies the
same orthogonal map R. R spreads an update's energy evenly over the coordinates: a coordinate
of R x is about ||x|| / sqrt(D), so a small per-coordinate bound is rarely binding and few
bits per coordinate carry the group's sum. The server applies R's inverse to the unmasked sum
(R is linear, so R^-1 (sum R x_i) = sum x_i).

Portable (FORMAT.md 12.2): the block size is the largest power of two L <= 4096 that pads d to
D = ceil(d / L) * L with D - d <= d / 32; the signs are bit 0 of the words of
PRG(HKDF(graph_seed, "rotation signs", ctx), D) (1: -1); the order is 0..D-1 sorted by
(PRG(HKDF(graph_seed, "rotation order", ctx), D) word, index); then y[k] = (s * pad(x))[order[k]]
and each block of L is multiplied by H_L / sqrt(L) (Sylvester's Hadamard matrix, natural order).
Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfleet.protocol.secagg import crypto

MAX_BLOCK = 4096


def block_size(dim: int) -> int:
    """The largest power of two L <= 4096 whose padding of ``dim`` stays within dim / 32."""
    block = MAX_BLOCK
    while block > 1 and -(-dim // block) * block - dim > dim / 32:
        block //= 2
    return block


def rotated_dim(dim: int) -> int:
    block = block_size(dim)
    return -(-dim // block) * block


def hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """Each block of ``block`` values times H_block / sqrt(block) (H symmetric, H^2 = block I,
    so this map is its own inverse). Butterflies in the textbook order: stage h = 1, 2, 4, ...
    replaces (a, b) at (j, j + h) by (a + b, a - b)."""
    y = np.asarray(x, dtype=np.float64).copy()
    h = 1
    while h < block:
        v = y.reshape(-1, 2, h)
        a, b = v[:, 0, :].copy(), v[:, 1, :]
        v[:, 0, :] = a + b
        v[:, 1, :] = a - b
        h *= 2
    return y * (1.0 / math.sqrt(block))


@dataclass(frozen=True)
class Rotation:
    """R for a group: ``dim`` d in, ``rotated_dim`` D out."""

    dim: int
    block: int
    signs: np.ndarray  # (D,) float64, +-1
    order: np.ndarray  # (D,) int64: rotated input k takes padded coordinate order[k]

    @property
    def rotated_dim(self) -> int:
        return int(self.signs.size)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(d,) -> (D,): R x."""
        padded = np.zeros(self.rotated_dim)
        padded[: self.dim] = x
        return hadamard((padded * self.signs)[self.order], self.block)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """(D,) -> (d,): R^T y, the first d coordinates (R^T R x = x for a padded x)."""
        mixed = hadamard(y, self.block)
        padded = np.empty(self.rotated_dim)
        padded[self.order] = mixed
        return (padded * self.signs)[: self.dim]


def rotation(graph_seed: bytes, group: bytes, dim: int) -> Rotation:
    block = block_size(dim)
    size = -(-dim // block) * block
    bits = crypto.prg_words(crypto.hkdf(graph_seed, "rotation signs", group), size) & np.uint64(1)
    signs = 1.0 - 2.0 * bits.astype(np.float64)
    words = crypto.prg_words(crypto.hkdf(graph_seed, "rotation order", group), size)
    order = np.lexsort((np.arange(size), words)).astype(np.int64)
    return Rotation(dim, block, signs, order)
