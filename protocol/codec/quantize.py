"""Step 4 and 5: quantize the values picked for each tensor and lay them out on the wire.

``Quantize`` is the stochastic uniform quantizer of ``protocol.quant`` (QSGD, Alistarh et
al., 2017), optionally with least-squares scales for deterministic rounding
(``quant.fit_scales``); ``Float32`` sends values as they are. Both return the wire bytes and the
float32 values the server will decode, which error feedback needs. ``to_wire`` then picks
the tensor encoding: "dense"/"quant" for a full tensor, "sparse" (with the smaller of
bitmap and delta-varint index coding) for a picked subset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedfleet.protocol import quant
from fedfleet.protocol.codec.types import Pick
from fedfleet.protocol.encodings import encode_quant, encode_sparse
from fedfleet.protocol.wire import WireTensor


@dataclass(frozen=True)
class Section:
    """Encoded values: wire bytes, their header fields, and how to get what they decode to
    (only error feedback asks, so dequantizing is skipped otherwise)."""

    blob: bytes
    fields: dict[str, Any]
    decoded: Callable[[], np.ndarray]  # -> float32 (count,)


class ValueCoder(Protocol):
    @property
    def bits(self) -> int: ...

    def __call__(self, values: np.ndarray, rng: np.random.Generator) -> Section: ...


@dataclass(frozen=True)
class Float32:
    bits: int = 32

    def __call__(self, values: np.ndarray, rng: np.random.Generator) -> Section:
        v32 = np.ascontiguousarray(values, dtype=np.float32)
        return Section(v32.astype("<f4", copy=False).tobytes(), {}, lambda: v32)


@dataclass(frozen=True)
class Quantize:
    bits: int
    chunk: int = 256
    stochastic: bool = True
    fit_scale: bool = False  # least-squares scales (``quant.fit_scales``); deterministic rounding only

    def __call__(self, values: np.ndarray, rng: np.random.Generator) -> Section:
        fitted = quant.fit_scales(values, self.bits, self.chunk) if self.fit_scale else None
        scales, codes = quant.quantize(values, self.bits, self.chunk, rng if self.stochastic else None, fitted)
        fields, blob = encode_quant(scales, codes, self.bits, self.chunk)
        return Section(blob, fields, lambda: quant.dequantize(scales, codes, self.bits, self.chunk))


def to_wire(name: str, shape: tuple[int, ...], pick: Pick, section: Section, bits: int) -> WireTensor:
    if pick.indices is None:
        encoding = "dense" if bits == 32 else "quant"
        return WireTensor(name, "float32", shape, encoding, section.fields, section.blob)
    size = int(np.prod(shape, dtype=np.int64))
    chunk = section.fields.get("chunk")
    fields, blob = encode_sparse(pick.indices, size, section.blob, pick.indices.size, bits, chunk)
    return WireTensor(name, "float32", shape, "sparse", fields, blob)
