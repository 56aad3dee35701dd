"""Bit-level building blocks of wire format v1: code packing, bitmaps and varints.

All three are specified in FORMAT.md; this module is the reference implementation.
Encoders here trust their input (it comes from our own codec); decoders check every
byte and raise ``MalformedMessage`` on anything a conforming encoder cannot produce,
so that each valid message has exactly one byte representation.
"""

from __future__ import annotations

import numpy as np

from fedfleet.protocol.errors import MalformedMessage

BIT_WIDTHS = (1, 2, 4, 8)
Blob = bytes | memoryview  # received bytes are sliced without copying
# Indices are < 2**28 (MAX_ELEMENTS), so a delta needs at most 4 varint bytes.
MAX_VARINT_BYTES = 4


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits each."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes (< 2**bits) LSB-first: code i sits at bit offset (i*bits) mod 8
    of byte floor(i*bits/8); unused high bits of the last byte are zero."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.tobytes()
    if bits == 1:
        return np.packbits(codes, bitorder="little").tobytes()
    per = 8 // bits
    padded = np.zeros(packed_nbytes(codes.size, bits) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    lanes = padded.reshape(-1, per)
    out = lanes[:, 0].copy()
    for j in range(1, per):
        out |= lanes[:, j] << np.uint8(j * bits)
    return out.tobytes()


def unpack_codes(blob: Blob, count: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_codes``; rejects a wrong length and non-zero padding bits."""
    if len(blob) != packed_nbytes(count, bits):
        raise MalformedMessage(
            f"{count} codes of {bits} bits need {packed_nbytes(count, bits)} bytes, got {len(blob)}"
        )
    raw = np.frombuffer(blob, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    lanes = np.empty((raw.size, per), dtype=np.uint8)
    for j in range(per):
        lanes[:, j] = (raw >> np.uint8(j * bits)) & mask
    flat = lanes.reshape(-1)
    if flat[count:].any():
        raise MalformedMessage("padding bits after the last code must be zero")
    return flat[:count]


def encode_bitmap(indices: np.ndarray, size: int) -> bytes:
    """Bit i (LSB-first, as in ``pack_codes`` with 1 bit) is set iff i is an index."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[indices] = 1
    return np.packbits(mask, bitorder="little").tobytes()


def decode_bitmap(blob: Blob, size: int, nnz: int) -> np.ndarray:
    """Indices of set bits, strictly increasing; checks length, padding and popcount."""
    bits = unpack_codes(blob, size, 1)
    indices = np.flatnonzero(bits)
    if indices.size != nnz:
        raise MalformedMessage(f"bitmap has {indices.size} set bits but nnz is {nnz}")
    return indices.astype(np.int64)


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes of each value as an unsigned LEB128 varint (values < 2**28)."""
    v = np.asarray(values, dtype=np.int64)
    return (1 + (v >= 1 << 7).astype(np.int64) + (v >= 1 << 14) + (v >= 1 << 21)).astype(np.int64)


def delta_varint_nbytes(indices: np.ndarray) -> int:
    return int(varint_sizes(_deltas(indices)).sum())


def encode_delta_varint(indices: np.ndarray) -> bytes:
    """Strictly increasing indices as LEB128 varints of i_0, i_1-i_0, i_2-i_1, ...
    (low 7 bits first, high bit set on every byte but the last of a value)."""
    deltas = _deltas(indices)
    sizes = varint_sizes(deltas)
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    for j in range(MAX_VARINT_BYTES):
        has = sizes > j
        group = (deltas[has] >> (7 * j)) & 0x7F
        more = (sizes[has] > j + 1).astype(np.int64) << 7
        out[starts[has] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


def decode_delta_varint(blob: Blob, size: int, nnz: int) -> np.ndarray:
    """Inverse of ``encode_delta_varint``. Rejects: a count other than ``nnz``, a value
    spread over more than 4 bytes or with a redundant zero top byte, a zero gap
    (duplicate) and an index >= ``size``."""
    raw = np.frombuffer(blob, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)  # last byte of each varint
    if ends.size != nnz or (raw.size and (ends.size == 0 or ends[-1] != raw.size - 1)):
        raise MalformedMessage(f"index section does not hold exactly {nnz} varints")
    if nnz == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise MalformedMessage(f"varint longer than {MAX_VARINT_BYTES} bytes")
    if ((lengths > 1) & (raw[ends] == 0)).any():
        raise MalformedMessage("varint is not in its shortest form")
    deltas = np.zeros(nnz, dtype=np.int64)
    for j in range(MAX_VARINT_BYTES):
        has = lengths > j
        deltas[has] |= (raw[starts[has] + j].astype(np.int64) & 0x7F) << (7 * j)
    if (deltas[1:] == 0).any():
        raise MalformedMessage("indices must be strictly increasing (a gap of 0 repeats an index)")
    indices = np.cumsum(deltas)
    if indices[-1] >= size:
        raise MalformedMessage(f"index {int(indices[-1])} is out of range for {size} elements")
    return indices


def _deltas(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64)
    out = np.empty_like(idx)
    if idx.size:
        out[0] = idx[0]
        out[1:] = np.diff(idx)
    return out
