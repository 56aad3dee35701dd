"""The parameters one secure group agrees on, derived once (``group_params``) and checked
there: the neighbour degree k, the share threshold t, the fewest survivors that may be
unmasked, the integer scale, the per-phone noise and the modulus 2**b of the masked sum.

b is the smallest width at which the group's sum cannot wrap: every phone's integer
update is bounded coordinate-wise by ceil(scale * clip) (clipping bounds |x_i| <= ||x||_2
<= clip, stochastic rounding adds less than 1) plus the noise's tail bound, so n phones
sum to at most n * bound in absolute value, which must stay below 2**(b-1) (the sum is
read back as a signed integer). A requested b below that raises ``SumMayWrap``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedfleet.protocol.secagg.errors import SumMayWrap
from fedfleet.protocol.secagg.graph import default_degree

MAX_MODULUS_BITS = 64  # masks and sums are uint64 words
NOISE_TAIL = 14  # noise draws beyond 14 sigma are redrawn (mass < 1e-43 per coordinate)


@dataclass(frozen=True)
class GroupParams:
    group: str  # the group's name, bound into every key and share: "round/<r>/group/<g>"
    size: int  # n, phones in the roster (numbered 1..n)
    dim: int  # d, integers per update
    degree: int  # k, neighbours per phone
    share_threshold: int  # t, shares that rebuild a secret (polynomial degree t - 1)
    min_survivors: int  # fewest masked uploads the group may unmask
    clip: float  # C, L2 bound of each float update
    scale: float  # integers per unit: x -> stochastic_round(scale * x)
    noise_sigma: float  # each phone's discrete Gaussian sigma, in integer units (0: none)
    noise_tail: int  # |noise| <= noise_tail, per coordinate
    modulus_bits: int  # b: masked values and the sum live mod 2**b
    graph_seed: bytes
    full_dim: int = 0  # D, the model's coordinates; dim < D: shared random-k (coords.py); 0: D = dim

    @property
    def model_dim(self) -> int:
        return self.full_dim or self.dim

    @property
    def context(self) -> bytes:
        return self.group.encode()

    @property
    def value_bound(self) -> int:
        """Largest |integer| one phone may contribute per coordinate, noise included."""
        return math.ceil(self.scale * self.clip) + self.noise_tail

    @property
    def word_bytes(self) -> int:
        """Bytes per masked value on the wire (little-endian)."""
        return -(-self.modulus_bits // 8)

    @property
    def sensitivity(self) -> float:
        """L2 bound of one phone's integer update before noise: scale * clip from the
        clipped floats, plus sqrt(d) from rounding each coordinate by less than 1."""
        return self.scale * self.clip + math.sqrt(self.dim)


def required_modulus_bits(size: int, value_bound: int) -> int:
    """Smallest b with size * value_bound < 2**(b - 1)."""
    return (size * value_bound).bit_length() + 1


def group_params(
    group: str,
    size: int,
    dim: int,
    *,
    clip: float,
    threshold: float = 0.55,
    degree: int | None = None,
    value_bits: int = 16,
    noise_multiplier: float = 0.0,
    modulus_bits: int | None = None,
    graph_seed: bytes = b"",
    full_dim: int = 0,
) -> GroupParams:
    """Derive and check a group's parameters.

    ``threshold`` (in (1/2, 1]) is a fraction: of each phone's neighbours (t = ceil(f * k))
    and of the group (min_survivors = ceil(f * n)). ``value_bits``: the clip maps to
    2**value_bits integer units. ``noise_multiplier`` z: the sum of at least min_survivors
    phones' noise has sigma >= z * sensitivity, the central Gaussian mechanism's noise
    (distributed DP, Kairouz, Liu and Steinke, 2021)."""
    if size < 2:
        raise ValueError(f"a secure group needs at least 2 phones, got {size}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 0.5 < threshold <= 1:
        raise ValueError(f"threshold must be in (0.5, 1], got {threshold!r}")
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be positive and finite, got {clip!r}")
    if not 1 <= value_bits <= 40:
        raise ValueError(f"value_bits must be in [1, 40], got {value_bits}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    k = default_degree(size) if degree is None else min(degree, size - 1)
    if k < 1 or (k < size - 1 and k % 2):
        raise ValueError(f"degree must be even and >= 2 (or >= n - 1 = {size - 1}), got {degree}")
    t = max(1, math.ceil(threshold * k))
    min_survivors = max(2, math.ceil(threshold * size))
    scale = float(2**value_bits) / clip
    sensitivity = scale * clip + math.sqrt(dim)
    sigma = noise_multiplier * sensitivity / math.sqrt(min_survivors)
    if 0 < sigma < 0.5:
        raise ValueError(f"each phone's noise sigma {sigma:.3f} is below 1/2, where the distributed bound fails")
    tail = math.ceil(NOISE_TAIL * sigma)
    bound = math.ceil(scale * clip) + tail
    need = required_modulus_bits(size, bound)
    if need > MAX_MODULUS_BITS:
        raise SumMayWrap(f"{size} phones of |value| <= {bound} need {need} bits, more than {MAX_MODULUS_BITS}")
    if modulus_bits is None:
        modulus_bits = need
    elif not need <= modulus_bits <= MAX_MODULUS_BITS:
        raise SumMayWrap(
            f"the sum of {size} phones of |value| <= {bound} can wrap modulo 2**{modulus_bits}: need {need} bits"
        )
    return GroupParams(group, size, dim, k, t, min_survivors, clip, scale, sigma, tail, modulus_bits, graph_seed,
                       full_dim)


def params_json(p: GroupParams) -> dict[str, Any]:
    """The parameters as the server sends them to the group's phones (JSON, seed in hex)."""
    return {"group": p.group, "size": p.size, "dim": p.dim, "degree": p.degree,
            "share_threshold": p.share_threshold, "min_survivors": p.min_survivors, "clip": p.clip,
            "scale": p.scale, "noise_sigma": p.noise_sigma, "noise_tail": p.noise_tail,
            "modulus_bits": p.modulus_bits, "graph_seed": p.graph_seed.hex(), "full_dim": p.model_dim}


def params_from_json(d: Mapping[str, Any]) -> GroupParams:
    return GroupParams(str(d["group"]), int(d["size"]), int(d["dim"]), int(d["degree"]), int(d["share_threshold"]),
                       int(d["min_survivors"]), float(d["clip"]), float(d["scale"]), float(d["noise_sigma"]),
                       int(d["noise_tail"]), int(d["modulus_bits"]), bytes.fromhex(str(d["graph_seed"])),
                       int(d.get("full_dim", 0)))
