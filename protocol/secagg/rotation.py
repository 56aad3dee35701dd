"""The random rotation of secure rounds (Kairouz, Liu and Steinke, 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", section 4): before
an update becomes integers it is padded, sign-flipped, permuted and multiplied by a block-diagonal
Walsh-Hadamard matrix, all drawn from the group's seed, so every phone of the group applies the
same orthogonal map R. R spreads an update's energy evenly over the coordinates: a coordinate
of R x is about ||x|| / sqrt(D), so a small per-coordinate bound is rarely binding and few
bits per coordinate carry the group's sum. The server applies R's inverse to the unmasked sum
(R is linear, so R^-1 (sum R x_i) = sum x_i).

Portable (FORMAT.md 12.2): d is padded to D = ceil(d / 32) * 32 (fewer than 32 zeros) and D is
cut into blocks: as many of 4096 as fit, then one for each set bit of the rest, largest first
(powers of two from 2048 down to 32), so no block is smaller than 32 and no coordinate is sent
for a whole block's padding; the signs are bit 0 of the words of
PRG(HKDF(graph_seed, "rotation signs", ctx), D) (1: -1); the order is 0..D-1 sorted by
(PRG(HKDF(graph_seed, "rotation order", ctx), D) word, index); then y[k] = (s * pad(x))[order[k]]
and each block of L values is multiplied by H_L / sqrt(L) (Sylvester's Hadamard matrix, natural
order).
Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfleet.protocol.secagg import crypto

MIN_BLOCK = 32
MAX_BLOCK = 4096


def rotated_dim(dim: int) -> int:
    """D: ``dim`` padded to a multiple of 32."""
    return -(-dim // MIN_BLOCK) * MIN_BLOCK


def blocks(dim: int) -> tuple[int, ...]:
    """The Hadamard blocks of D = rotated_dim(dim), in order: 4096s, then the binary digits of
    the rest, largest first. 20,000 -> 4 x 4096, 2048, 1024, 512, 32."""
    size = rotated_dim(dim)
    rest = size % MAX_BLOCK
    digits = [1 << k for k in range(rest.bit_length() - 1, -1, -1) if rest >> k & 1]
    return (MAX_BLOCK,) * (size // MAX_BLOCK) + tuple(digits)


def hadamard(x: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Along the last axis, each block of L values (``sizes``, in order) times H_L / sqrt(L) (H
    symmetric, H^2 = L I, so this map is its own inverse). Butterflies in the textbook order:
    stage h = 1, 2, 4, ... replaces (a, b) at (j, j + h) by (a + b, a - b); then each value times
    1 / sqrt(L). Runs of equal blocks go together."""
    y = np.asarray(x, dtype=np.float64).copy()
    lead, start = y.shape[:-1], 0
    for size in dict.fromkeys(sizes):  # equal sizes are adjacent: 4096s first, then distinct powers
        end = start + size * sizes.count(size)
        part = np.ascontiguousarray(y[..., start:end])
        h = 1
        while h < size:
            v = part.reshape(-1, 2, h)
            a, b = v[:, 0, :].copy(), v[:, 1, :]
            v[:, 0, :] = a + b
            v[:, 1, :] = a - b
            h *= 2
        y[..., start:end] = (part * (1.0 / math.sqrt(size))).reshape(*lead, end - start)
        start = end
    return y


@dataclass(frozen=True)
class Rotation:
    """R for a group: ``dim`` d in, ``rotated_dim`` D out."""

    dim: int
    blocks: tuple[int, ...]  # the Hadamard blocks, summing to D
    signs: np.ndarray  # (D,) float64, +-1
    order: np.ndarray  # (D,) int64: rotated input k takes padded coordinate order[k]

    @property
    def rotated_dim(self) -> int:
        return int(self.signs.size)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(d,) -> (D,): R x."""
        padded = np.zeros(self.rotated_dim)
        padded[: self.dim] = x
        return hadamard((padded * self.signs)[self.order], self.blocks)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """(D,) -> (d,): R^T y, the first d coordinates (R^T R x = x for a padded x)."""
        mixed = hadamard(y, self.blocks)
        padded = np.empty(self.rotated_dim)
        padded[self.order] = mixed
        return (padded * self.signs)[: self.dim]


def rotation(graph_seed: bytes, group: bytes, dim: int) -> Rotation:
    size = rotated_dim(dim)
    bits = crypto.prg_words(crypto.hkdf(graph_seed, "rotation signs", group), size) & np.uint64(1)
    signs = 1.0 - 2.0 * bits.astype(np.float64)
    words = crypto.prg_words(crypto.hkdf(graph_seed, "rotation order", group), size)
    order = np.lexsort((np.arange(size), words)).astype(np.int64)
    return Rotation(dim, blocks(dim), signs, order)
