"""Per-tensor encodings of wire format v1: "dense", "quant" and "sparse".

An encoding turns one array into (header fields, payload bytes) and back. Decoding is in
two phases so nothing is allocated before the header is trusted: ``check`` validates the
encoding's header fields against the tensor's shape and returns the range of payload
sizes they allow (the container bounds decompression by it); ``decode`` then validates
the bytes themselves. Both raise only ``ProtocolError`` subclasses.

Every lossy encoding decodes to dense float32 of the declared shape, so the server never
needs to know how a phone compressed its update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.protocol import quant
from fedfleet.protocol.errors import MalformedMessage, NonFiniteValues
from fedfleet.protocol.packing import (
    MAX_VARINT_BYTES,
    Blob,
    decode_bitmap,
    decode_delta_varint,
    delta_varint_nbytes,
    encode_bitmap,
    encode_delta_varint,
)

# dtype names on the wire -> numpy little-endian dtypes
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}
F32 = DTYPES["float32"]
INDEX_CODINGS = ("bitmap", "varint")

Fields = dict[str, Any]
CheckFn = Callable[[Fields, tuple[int, ...], np.dtype], tuple[int, int]]
DecodeFn = Callable[[Fields, Blob, tuple[int, ...], np.dtype], np.ndarray]


@dataclass(frozen=True)
class Encoding:
    name: str
    check: CheckFn  # header fields -> (min, max) payload bytes, before any allocation
    decode: DecodeFn


def dtype_of(name: object) -> np.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise MalformedMessage(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _only_keys(fields: Fields, allowed: tuple[str, ...], encoding: str) -> None:
    extra = sorted(set(fields) - set(allowed))
    if extra:
        raise MalformedMessage(f"encoding {encoding!r} does not define header keys {extra}")


def _need_float32(dtype: np.dtype, encoding: str) -> None:
    if dtype != F32:
        raise MalformedMessage(f"encoding {encoding!r} carries float32 tensors only, not {dtype.name}")


# --- dense: raw little-endian values in C order -------------------------------------------


def encode_dense(arr: np.ndarray) -> tuple[Fields, bytes]:
    return {}, np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def check_dense(fields: Fields, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int]:
    _only_keys(fields, (), "dense")
    size = math.prod(shape) * dtype.itemsize
    return size, size


def decode_dense(fields: Fields, blob: Blob, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    if len(blob) != count * dtype.itemsize:
        raise MalformedMessage(
            f"dense tensor needs {count * dtype.itemsize} bytes for shape {list(shape)}, got {len(blob)}"
        )
    arr = np.frombuffer(blob, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteValues("tensor contains NaN or Inf")
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --- quant: every element quantized (protocol.quant) ---------------------------------------


def encode_quant(scales: np.ndarray, codes: np.ndarray, bits: int, chunk: int) -> tuple[Fields, bytes]:
    return {"bits": bits, "chunk": chunk}, quant.encode_section(scales, codes, bits)


def check_quant(fields: Fields, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int]:
    _only_keys(fields, ("bits", "chunk"), "quant")
    _need_float32(dtype, "quant")
    bits, chunk = quant.check_quant_params(fields)
    size = quant.quant_nbytes(math.prod(shape), bits, chunk)
    return size, size


def decode_quant(fields: Fields, blob: Blob, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    values = quant.decode_section(blob, math.prod(shape), fields["bits"], fields["chunk"])
    return values.reshape(shape)


# --- sparse: index section (bitmap | delta varint), then float32 or quantized values ----


def encode_sparse(
    indices: np.ndarray, size: int, values: bytes, nnz: int, bits: int, chunk: int | None
) -> tuple[Fields, bytes]:
    """``indices`` strictly increasing; ``values`` already encoded (float32 or a quant
    section). Picks the smaller index coding; a tie goes to the bitmap."""
    bitmap_bytes = (size + 7) // 8
    if delta_varint_nbytes(indices) < bitmap_bytes:
        coding, index_blob = "varint", encode_delta_varint(indices)
    else:
        coding, index_blob = "bitmap", encode_bitmap(indices, size)
    fields: Fields = {"nnz": nnz, "index": coding, "bits": bits}
    if chunk is not None:
        fields["chunk"] = chunk
    return fields, index_blob + values


def _values_nbytes(nnz: int, bits: int, chunk: int | None) -> int:
    return 4 * nnz if chunk is None else quant.quant_nbytes(nnz, bits, chunk)


def _sparse_params(fields: Fields, size: int) -> tuple[int, str, int, int | None]:
    nnz, coding, bits = fields.get("nnz"), fields.get("index"), fields.get("bits")
    if type(nnz) is not int or not 0 <= nnz <= size:
        raise MalformedMessage(f"nnz must be an int in [0, {size}], got {nnz!r}")
    if coding not in INDEX_CODINGS:
        raise MalformedMessage(f"index must be one of {list(INDEX_CODINGS)}, got {coding!r}")
    if type(bits) is int and bits == 32:  # 32.0 is not a JSON integer (FORMAT.md)
        _only_keys(fields, ("nnz", "index", "bits"), "sparse")
        return nnz, coding, 32, None
    _only_keys(fields, ("nnz", "index", "bits", "chunk"), "sparse")
    bits, chunk = quant.check_quant_params(fields)
    return nnz, coding, bits, chunk


def check_sparse(fields: Fields, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int]:
    _need_float32(dtype, "sparse")
    size = math.prod(shape)
    nnz, coding, bits, chunk = _sparse_params(fields, size)
    values = _values_nbytes(nnz, bits, chunk)
    if coding == "bitmap":
        return values + (size + 7) // 8, values + (size + 7) // 8
    return values + nnz, values + MAX_VARINT_BYTES * nnz


def decode_sparse(fields: Fields, blob: Blob, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    size = math.prod(shape)
    nnz, coding, bits, chunk = _sparse_params(fields, size)
    split = len(blob) - _values_nbytes(nnz, bits, chunk)
    if split < 0:
        raise MalformedMessage("sparse tensor is shorter than its values section")
    if coding == "bitmap":
        if split != (size + 7) // 8:
            raise MalformedMessage(f"bitmap for {size} elements needs {(size + 7) // 8} bytes, got {split}")
        indices = decode_bitmap(blob[:split], size, nnz)
    else:
        indices = decode_delta_varint(blob[:split], size, nnz)
    if chunk is None:
        values = np.frombuffer(blob[split:], dtype=F32)
        if not np.isfinite(values).all():
            raise NonFiniteValues("sparse values contain NaN or Inf")
    else:
        values = quant.decode_section(blob[split:], nnz, bits, chunk)
    out = np.zeros(size, dtype=np.float32)
    out[indices] = values
    return out.reshape(shape)


ENCODINGS: dict[str, Encoding] = {
    "dense": Encoding("dense", check_dense, decode_dense),
    "quant": Encoding("quant", check_quant, decode_quant),
    "sparse": Encoding("sparse", check_sparse, decode_sparse),
}
