"""Float updates to integers and back, the codec of secure rounds (replacing float
quantization): clip to L2 norm C, rotate (rotation.py), scale by gamma, clip each coordinate
to [-B, B], stochastically round, add discrete Gaussian noise, reduce mod 2**b, pack b bits
a value. The server's unmasked sum, read as signed integers, divided by gamma and rotated
back, is the sum of the phones' clipped updates plus the summed noise (rotated back: R is
orthogonal, so the noise keeps its per-coordinate variance).

Stochastic rounding floor(v + u), u ~ U[0, 1) drawn from the phone's seeded generator, is
unbiased; it is redrawn while the rounded vector's L2 norm passes the group's sensitivity
(Kairouz, Liu and Steinke's conditional rounding; at most a few draws). The noise is the discrete Gaussian N_Z(0, sigma**2) (Canonne, Kamath and
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
from fedfleet.protocol.secagg.rotation import Rotation, rotation


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


def round_bounded(v: np.ndarray, norm_bound: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of ``v``, redrawn until ||result||_2 <= ``norm_bound``."""
    while True:
        q = stochastic_round(v, rng)
        if float(np.dot(q, q)) <= norm_bound * norm_bound:
            return q


def group_rotation(params: GroupParams) -> Rotation:
    return rotation(params.graph_seed, params.context, params.dim)


def to_integers(x: np.ndarray, params: GroupParams, rng: np.random.Generator,
                rotated: Rotation | None = None) -> np.ndarray:
    """A float update (d,) -> the phone's integer contribution (D,) int64: clip, rotate, scale,
    clip to [-B, B], round, add noise. Draws the rounding's uniforms, then the noise, from ``rng``.
    ``rotated``: the group's rotation, if already made."""
    r = rotated if rotated is not None else group_rotation(params)
    v = np.clip(r.apply(clip_l2(x, params.clip)) * params.scale, -params.clip_bound, params.clip_bound)
    q = round_bounded(v, params.sensitivity, rng)
    return q + discrete_gaussian(params.noise_sigma, q.size, params.noise_tail, rng)


def mean_from_sum(total: np.ndarray, params: GroupParams, count: int) -> np.ndarray:
    """The unmasked signed sum (D,) of ``count`` phones -> their mean update (d,) float64."""
    return group_rotation(params).invert(total.astype(np.float64) / (params.scale * count))


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


def pack(r: np.ndarray, bits: int) -> bytes:
    """Residues mod 2**bits -> a little-endian bit stream: value i holds bits [i*bits, (i+1)*bits),
    least significant bit first; the last byte is padded with zero bits."""
    stream = np.unpackbits(r.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(stream[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    """``pack``'s inverse: ``count`` values of ``bits`` bits, uint64."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, :bits] = stream.reshape(count, bits)
    return np.packbits(full, axis=1, bitorder="little").reshape(-1).view("<u8").astype(np.uint64)
