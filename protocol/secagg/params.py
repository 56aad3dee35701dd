"""The parameters one secure group agrees on, derived once (``group_params``) and checked
there: the neighbour degree k, the share threshold t, the fewest survivors that may be
unmasked, the rotation, the integer scale, the per-coordinate bound, the per-phone noise and
the modulus 2**b of the masked sum.

Each phone's update is rotated (rotation.py: D coordinates, each about ||x|| / sqrt(D)),
scaled by gamma, clipped to |v| <= B per coordinate and stochastically rounded, so its
integers lie in [-B, B]: the signal part of n phones' sum is at most n * B in absolute value,
a proof. The noise part (a sum of at most n discrete Gaussians of sigma each, each
sigma**2-sub-Gaussian: Canonne, Kamath and Steinke, 2020, Corollary 9) exceeds
N = sigma * sqrt(2 n ln(2 D / P_WRAP)) at some coordinate with probability below
P_WRAP = 2**-40 per group (Chernoff and a union bound over D coordinates). b is given (or the
smallest b >= 12 that works) and B is the largest integer with n * B + N < 2**(b-1), so the
sum, read back as a signed b-bit integer, does not wrap. gamma = B * sqrt(D) / 4 / clip: the
bound sits at 4 standard deviations of a full-norm update's rotated coordinate. No B >= 1
fitting raises ``SumMayWrap``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedfleet.protocol.secagg.errors import SumMayWrap
from fedfleet.protocol.secagg.graph import default_degree
from fedfleet.protocol.secagg.rotation import blocks, rotated_dim

MAX_MODULUS_BITS = 62  # masks and sums are uint64 words; the bound search stays in exact integers
MIN_MODULUS_BITS = 12  # b when not given: the smallest width >= 12 at which the group's sum fits
NOISE_TAIL = 14  # noise draws beyond 14 sigma are redrawn (mass < 1e-43 per coordinate)
P_WRAP = 2.0**-40  # the chance that the group's summed noise passes its bound at some coordinate
CLIP_SIGMAS = 4  # B = 4 standard deviations of a full-norm update's rotated coordinate


@dataclass(frozen=True)
class GroupParams:
    group: str  # the group's name, bound into every key and share: "round/<r>/group/<g>"
    size: int  # n, phones in the roster (numbered 1..n)
    dim: int  # d, coordinates each phone sends (before the rotation)
    degree: int  # k, neighbours per phone
    share_threshold: int  # t, shares that rebuild a secret (polynomial degree t - 1)
    min_survivors: int  # fewest masked uploads the group may unmask
    clip: float  # C, L2 bound of each float update
    scale: float  # gamma, integers per unit: v -> stochastic_round(gamma * (R x))
    noise_sigma: float  # each phone's discrete Gaussian sigma, in integer units (0: none)
    noise_tail: int  # |noise| <= noise_tail, per coordinate
    modulus_bits: int  # b: masked values and the sum live mod 2**b, packed b bits each
    graph_seed: bytes
    full_dim: int = 0  # the model's coordinates; dim < full_dim: shared random-k (coords.py); 0: = dim
    clip_bound: int = 0  # B: |rounded rotated coordinate| <= B, enforced

    @property
    def model_dim(self) -> int:
        return self.full_dim or self.dim

    @property
    def rotated_dim(self) -> int:
        """D, the integers (and masked values) per update: d padded to a multiple of 32."""
        return rotated_dim(self.dim)

    @property
    def blocks(self) -> tuple[int, ...]:
        """The rotation's Hadamard blocks (largest first), summing to D."""
        return blocks(self.dim)

    @property
    def context(self) -> bytes:
        return self.group.encode()

    @property
    def value_bound(self) -> int:
        """Largest |integer| one phone may contribute per coordinate, noise included."""
        return self.clip_bound + self.noise_tail

    @property
    def upload_bytes(self) -> int:
        """Bytes of a masked update on the wire: D values of b bits, packed."""
        return -(-self.rotated_dim * self.modulus_bits // 8)

    @property
    def sensitivity(self) -> float:
        """L2 bound of one phone's integer update before noise (``integer.round_bounded``
        redraws its rounding until it holds)."""
        return rounded_norm_bound(self.scale * self.clip, self.rotated_dim)


def rounded_norm_bound(norm: float, dim: int) -> float:
    """Kairouz, Liu and Steinke's conditional rounding (Theorem 2, beta = exp(-1/2)): a vector of
    L2 norm <= ``norm`` in ``dim`` coordinates, stochastically rounded, has squared norm at most
    norm**2 + dim / 4 + norm + sqrt(dim) / 2 with probability >= 1 - beta; a rounding past it is
    redrawn. Never more than norm + sqrt(dim) (each coordinate moves by less than 1)."""
    return min(math.sqrt(norm * norm + dim / 4 + norm + math.sqrt(dim) / 2), norm + math.sqrt(dim))


def noise_sum_bound(sigma: float, size: int, dim: int) -> int:
    """|sum of ``size`` phones' noise| at every one of ``dim`` coordinates, except with
    probability P_WRAP: the sub-Gaussian bound, or ``size`` tails when that is smaller (a proof)."""
    if sigma <= 0:
        return 0
    chernoff = sigma * math.sqrt(2 * size * math.log(2 * dim / P_WRAP))
    return min(math.ceil(chernoff), size * math.ceil(NOISE_TAIL * sigma))


def _fit(size: int, dim: int, bits: int, clip: float, noise_multiplier: float, survivors: int) -> int:
    """The largest B >= 1 whose group sum fits in ``bits``, or 0."""
    room = 2 ** (bits - 1) - 1

    def fits(bound: int) -> bool:
        gamma_c = bound * math.sqrt(dim) / CLIP_SIGMAS
        sigma = noise_multiplier * rounded_norm_bound(gamma_c, dim) / math.sqrt(survivors)
        return size * bound + noise_sum_bound(sigma, size, dim) <= room

    lo, hi = 0, room // size
    while lo < hi:  # fits is monotone in B
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def group_params(
    group: str,
    size: int,
    dim: int,
    *,
    clip: float,
    threshold: float = 0.55,
    degree: int | None = None,
    noise_multiplier: float = 0.0,
    modulus_bits: int | None = None,
    graph_seed: bytes = b"",
    full_dim: int = 0,
) -> GroupParams:
    """Derive and check a group's parameters.

    ``threshold`` (in (1/2, 1]) is a fraction: of each phone's neighbours (t = ceil(f * k))
    and of the group (min_survivors = ceil(f * n)). ``modulus_bits`` b (None: the smallest
    b >= 12 that fits). ``noise_multiplier`` z: the sum of at least min_survivors phones' noise
    has sigma >= z * sensitivity, the central Gaussian mechanism's noise (distributed DP,
    Kairouz, Liu and Steinke, 2021)."""
    if size < 2:
        raise ValueError(f"a secure group needs at least 2 phones, got {size}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 0.5 < threshold <= 1:
        raise ValueError(f"threshold must be in (0.5, 1], got {threshold!r}")
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be positive and finite, got {clip!r}")
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if modulus_bits is not None and not 2 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [2, {MAX_MODULUS_BITS}], got {modulus_bits}")
    k = default_degree(size) if degree is None else min(degree, size - 1)
    if k < 1 or (k < size - 1 and k % 2):
        raise ValueError(f"degree must be even and >= 2 (or >= n - 1 = {size - 1}), got {degree}")
    t = max(1, math.ceil(threshold * k))
    min_survivors = max(2, math.ceil(threshold * size))
    big_d = rotated_dim(dim)
    widths = [modulus_bits] if modulus_bits is not None else range(MIN_MODULUS_BITS, MAX_MODULUS_BITS + 1)
    bits = bound = 0
    for bits in widths:
        bound = _fit(size, big_d, bits, clip, noise_multiplier, min_survivors)
        if bound:
            break
    if not bound:
        raise SumMayWrap(f"the sum of {size} phones can wrap modulo 2**{bits} even at 1 step per coordinate "
                         f"(noise multiplier {noise_multiplier}): more bits are needed")
    scale = bound * math.sqrt(big_d) / CLIP_SIGMAS / clip
    sigma = noise_multiplier * rounded_norm_bound(scale * clip, big_d) / math.sqrt(min_survivors)
    if 0 < sigma < 0.5:
        raise ValueError(f"each phone's noise sigma {sigma:.3f} is below 1/2, where the distributed bound fails")
    return GroupParams(group, size, dim, k, t, min_survivors, clip, scale, sigma, math.ceil(NOISE_TAIL * sigma),
                       bits, graph_seed, full_dim, bound)


def params_json(p: GroupParams) -> dict[str, Any]:
    """The parameters as the server sends them to the group's phones (JSON, seed in hex)."""
    return {"group": p.group, "size": p.size, "dim": p.dim, "degree": p.degree,
            "share_threshold": p.share_threshold, "min_survivors": p.min_survivors, "clip": p.clip,
            "scale": p.scale, "noise_sigma": p.noise_sigma, "noise_tail": p.noise_tail,
            "modulus_bits": p.modulus_bits, "graph_seed": p.graph_seed.hex(), "full_dim": p.model_dim,
            "clip_bound": p.clip_bound, "rotated_dim": p.rotated_dim, "blocks": list(p.blocks),
            "sensitivity": p.sensitivity}


def params_from_json(d: Mapping[str, Any]) -> GroupParams:
    return GroupParams(str(d["group"]), int(d["size"]), int(d["dim"]), int(d["degree"]), int(d["share_threshold"]),
                       int(d["min_survivors"]), float(d["clip"]), float(d["scale"]), float(d["noise_sigma"]),
                       int(d["noise_tail"]), int(d["modulus_bits"]), bytes.fromhex(str(d["graph_seed"])),
                       int(d.get("full_dim", 0)), int(d["clip_bound"]))
