"""Float updates to integers and back, the codec of secure rounds (replacing float
quantization): clip to L2 norm C, scale, stochastically round, add discrete Gaussian noise,
reduce mod 2**b. The server's unmasked sum, read as signed integers and divided by the
scale, is the sum of the phones' clipped updates plus the summed noise.

Stochastic rounding floor(v + u), u ~ U[0, 1) drawn from the phone's seeded generator,
is unbiased. The noise is the discrete Gaussian N_Z(0, sigma**2) (Canonne, Kamath and
Steinke, 2020, "The Discrete Gaussian for Differential Privacy", Algorithm 3: a discrete
Laplace proposal accepted with probability exp(-(|y| - sigma**2/s)**2 / (2 sigma**2))),
vectorised, with float acceptance tests, and redrawn beyond the group's tail bound so the
sum provably cannot wrap (the redrawn mass is below 1e-43 per coordinate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedfleet.protocol.secagg.params import GroupParams


def flatten(update: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Tensors in ``names`` order, each in C order, as one float64 vector."""
    return np.concatenate([np.asarray(update[n], dtype=np.float64).reshape(-1) for n in names])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = vector[at : at + size].reshape(shape)
        at += size
    return out


def clip_l2(x: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.sqrt(np.dot(x, x)))
    return x * (bound / norm) if norm > bound else x


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(x + u) per element, u ~ U[0, 1): E[result] = x. int64."""
    return np.floor(x + rng.random(x.size)).astype(np.int64)


def discrete_gaussian(sigma: float, count: int, tail: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws of N_Z(0, sigma**2) conditioned on |y| <= tail, int64."""
    out = np.zeros(count, dtype=np.int64)
    if sigma <= 0 or count == 0:
        return out
    s = math.floor(sigma) + 1
    p = 1.0 - math.exp(-1.0 / s)
    todo = np.arange(count)
    while todo.size:
        # discrete Laplace with scale s: the difference of two geometric counts
        y = rng.geometric(p, todo.size) - rng.geometric(p, todo.size)
        accept = rng.random(todo.size) < np.exp(-((np.abs(y) - sigma * sigma / s) ** 2) / (2 * sigma * sigma))
        accept &= np.abs(y) <= tail
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def to_integers(x: np.ndarray, params: GroupParams, rng: np.random.Generator) -> np.ndarray:
    """A float update (d,) -> the phone's integer contribution (d,) int64: clip, scale,
    round, add noise. Draws d uniforms, then the noise, from ``rng``."""
    q = stochastic_round(clip_l2(x, params.clip) * params.scale, rng)
    return q + discrete_gaussian(params.noise_sigma, q.size, params.noise_tail, rng)


def to_field(q: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed integers -> their residues mod 2**b, uint64."""
    r = q.astype(np.int64).view(np.uint64)
    if modulus_bits < 64:
        r = r & np.uint64((1 << modulus_bits) - 1)
    return r


def from_field(r: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Residues mod 2**b -> signed integers in [-2**(b-1), 2**(b-1)), int64."""
    shift = np.uint64(64 - modulus_bits)  # sign-extend bit b-1: shift it to the top and back
    return (r.astype(np.uint64) << shift).view(np.int64) >> np.int64(64 - modulus_bits)


def words_to_bytes(r: np.ndarray, word_bytes: int) -> bytes:
    """uint64 residues -> ``word_bytes`` little-endian bytes each."""
    raw = r.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :word_bytes]
    return raw.tobytes()


def words_from_bytes(data: bytes, count: int, word_bytes: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8).reshape(count, word_bytes)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, :word_bytes] = raw
    return full.reshape(-1).view("<u8").astype(np.uint64)
