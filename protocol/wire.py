"""Wire format v1: one self-describing binary message of named tensors.

Layout (little-endian; FORMAT.md is the normative text)::

    magic        4 bytes  b"FFLT"
    version      u16      1
    flags        u16      bit 0: payload is zlib-compressed; bit 1: header is zlib-compressed
    header_len   u32      length of the header in bytes (as on the wire)
    header       JSON     {"kind", "meta", "tensors": [{name, dtype, shape, encoding, ..., nbytes}]}
    payload_len  u32      length of the payload as it is on the wire
    payload      bytes    tensor blobs, concatenated in header order
    crc32        u32      CRC-32 (zlib/IEEE) of every byte before it

Everything received is untrusted: ``decode_message`` checks each field against hard
limits and against the receiver's expectations before it allocates or inflates anything,
and raises only ``ProtocolError`` subclasses.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from fedfleet.protocol.canonical import canonical_header, canonical_json, parse_header
from fedfleet.protocol.encodings import DTYPES, ENCODINGS, Encoding, dtype_of, encode_dense
from fedfleet.protocol.errors import (
    ChecksumMismatch,
    MalformedMessage,
    ProtocolError,
    ShapeMismatch,
    UnsupportedEncoding,
    UnsupportedVersion,
)
from fedfleet.protocol.packing import Blob

MAGIC = b"FFLT"
FORMAT_VERSION = 1
FLAG_ZLIB = 1
FLAG_ZLIB_HEADER = 2  # the header is a zlib stream of the canonical JSON (FORMAT.md section 1)
KNOWN_FLAGS = FLAG_ZLIB | FLAG_ZLIB_HEADER
ZLIB_LEVEL = 6
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header_len
_U32 = struct.Struct("<I")

MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_NAME_LEN = 256
MAX_ELEMENTS = 1 << 28  # per message, after decompression: 1 GiB of float32
KINDS = ("update", "model")
_COMMON_KEYS = ("name", "dtype", "shape", "encoding", "nbytes")
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor: shape and dtype name."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class TensorMessage:
    kind: str
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    wire_bytes: int = 0
    encodings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WireTensor:
    """One tensor as it goes on the wire: header fields (in canonical order) and blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    fields: dict[str, Any]
    blob: bytes


def encode_message(
    kind: str,
    meta: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    encoded: Mapping[str, tuple[str, dict[str, Any], bytes]] | None = None,
    compress: bool = False,
) -> bytes:
    """Serialise named tensors. ``encoded`` supplies pre-encoded blobs (name -> (encoding,
    fields, blob)) for tensors the update codec compressed; the rest are sent dense."""
    return encode_wire(kind, meta, wire_tensors(tensors, encoded), compress=compress)


def wire_tensors(
    tensors: Mapping[str, np.ndarray], encoded: Mapping[str, tuple[str, dict[str, Any], bytes]] | None = None
) -> list[WireTensor]:
    """Named tensors as they go on the wire (dense unless ``encoded`` has them). A sender
    that frames the same tensors under different meta keeps these and calls ``encode_wire``."""
    wire: list[WireTensor] = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.name not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype.name} cannot be sent")
        if encoded is not None and name in encoded:
            enc_name, fields, blob = encoded[name]
        else:
            enc_name = "dense"
            fields, blob = encode_dense(arr)
        wire.append(WireTensor(name, arr.dtype.name, tuple(arr.shape), enc_name, dict(fields), blob))
    return wire


def encode_wire(
    kind: str, meta: Mapping[str, Any], tensors: Sequence[WireTensor], *, compress: bool = False
) -> bytes:
    """Frame already-encoded tensors. The header is canonical JSON (protocol.canonical).
    ``compress``: zlib over the payload, and over the header too when that makes it shorter
    (the header of a small sparse update is most of its bytes)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    header = canonical_header(kind, meta, _tensor_list_json(tensors))
    blobs = [t.blob for t in tensors]
    if compress:
        flags = FLAG_ZLIB
        packed = zlib.compress(header, 9)
        if len(packed) < len(header):
            header, flags = packed, flags | FLAG_ZLIB_HEADER
        return frame(header, zlib.compress(b"".join(blobs), ZLIB_LEVEL), flags=flags)
    return frame(header, *blobs)


class _Remembered(Generic[K, V]):
    """At most ``size`` values by key, the oldest forgotten first; safe across threads. A
    federation's messages repeat a few tensor lists (one model, its codec settings), so the
    work a list costs (validating it, writing its JSON) is done once per list."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            while len(self._items) >= self.size:
                del self._items[next(iter(self._items))]
            self._items[key] = value


_REMEMBER_MAX_CHARS = 1 << 14  # lists whose JSON or repr is longer are worked out every time
_LIST_JSON: _Remembered[tuple[Any, ...], str] = _Remembered()  # a tensor list's values -> its canonical JSON
_ENTRIES: _Remembered[str, list[_Entry]] = _Remembered()  # repr of a validated tensor list -> its entries


def _tensor_list_json(tensors: Sequence[WireTensor]) -> str:
    """The header's "tensors" array as canonical JSON, short ones remembered by every value
    that goes into them."""
    key = tuple((t.name, t.dtype, t.shape, t.encoding, tuple((k, type(v), v) for k, v in t.fields.items()), len(t.blob))
                for t in tensors)  # with each field's type: 1, 1.0 and True are equal keys but not equal JSON
    try:
        hit = _LIST_JSON.get(key)
    except TypeError:  # a field value that cannot be a key (a list): not remembered
        key, hit = (), None
    if hit is not None:
        return hit
    entries: list[dict[str, Any]] = []
    for t in tensors:
        if not isinstance(t.name, str) or not 0 < len(t.name) <= MAX_NAME_LEN or len(t.shape) > MAX_NDIM:
            raise ValueError(
                f"tensor {t.name!r}: name must be 1..{MAX_NAME_LEN} chars, at most {MAX_NDIM} dims"
            )
        entry: dict[str, Any] = {
            "name": t.name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "encoding": t.encoding,
        }
        entry.update(t.fields)
        entry["nbytes"] = len(t.blob)
        entries.append(entry)
    text = canonical_json(entries)
    if key and len(text) <= _REMEMBER_MAX_CHARS:
        _LIST_JSON.put(key, text)
    return text


def frame(header: bytes, *payload: bytes, flags: int = 0, version: int = FORMAT_VERSION) -> bytes:
    """prefix + header + payload_len + payload + CRC-32: the container around given bytes
    (``payload`` may come in pieces; they are copied once, into the message)."""
    head = _PREFIX.pack(MAGIC, version, flags, len(header)) + header + _U32.pack(sum(map(len, payload)))
    crc = zlib.crc32(head)
    for part in payload:
        crc = zlib.crc32(part, crc)
    return b"".join([head, *payload, _U32.pack(crc)])


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    encoding: Encoding
    fields: dict[str, Any]
    nbytes: int
    dtype_name: str  # as the header names it (numpy's dtype.name is slow to look up)


def _check_entry(raw: object, seen: set[str]) -> _Entry:
    if not isinstance(raw, dict):
        raise MalformedMessage("tensor entry must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise MalformedMessage(f"tensor name must be a string of 1..{MAX_NAME_LEN} characters")
    if name in seen:
        raise MalformedMessage(f"tensor {name!r} appears twice")
    seen.add(name)
    shape = raw.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape)
    ):
        raise MalformedMessage(
            f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints"
        )
    nbytes = raw.get("nbytes")
    if type(nbytes) is not int or nbytes < 0:
        raise MalformedMessage(f"tensor {name!r}: nbytes must be a non-negative int")
    enc_name = raw.get("encoding")
    encoding = ENCODINGS.get(enc_name) if isinstance(enc_name, str) else None
    if encoding is None:
        raise UnsupportedEncoding(f"tensor {name!r}: unknown encoding {enc_name!r}")
    fields = {k: v for k, v in raw.items() if k not in _COMMON_KEYS}
    if math.prod(shape) > MAX_ELEMENTS:
        raise MalformedMessage(f"tensor {name!r} declares more than {MAX_ELEMENTS} elements")
    try:
        dtype = dtype_of(raw.get("dtype"))
        lo, hi = encoding.check(fields, tuple(shape), dtype)
    except ProtocolError as exc:
        raise type(exc)(f"tensor {name!r}: {exc}") from None
    if not lo <= nbytes <= hi:
        raise MalformedMessage(f"tensor {name!r}: nbytes {nbytes} is outside [{lo}, {hi}] for its fields")
    return _Entry(name, tuple(shape), dtype, encoding, fields, nbytes, str(raw["dtype"]))


def decode_message(
    data: bytes,
    *,
    expected: Mapping[str, TensorSpec] | None = None,
    max_bytes: int | None = None,
) -> TensorMessage:
    """Parse and validate a message. With ``expected``, the tensor set, shapes and dtypes
    must match it exactly (``ShapeMismatch`` otherwise), checked before any payload work."""
    if max_bytes is not None and len(data) > max_bytes:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _PREFIX.size + 2 * _U32.size:
        raise MalformedMessage(f"message of {len(data)} bytes is shorter than the fixed prefix")
    magic, version, flags, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"format version {version} is not supported (this side speaks {FORMAT_VERSION})"
        )
    if flags & ~KNOWN_FLAGS:
        raise MalformedMessage(f"unknown flag bits 0x{flags:04x}")
    (crc,) = _U32.unpack_from(data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise ChecksumMismatch("CRC-32 does not match: the message was truncated or corrupted")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + 8 > len(data):
        raise MalformedMessage(f"header length {header_len} does not fit the message")
    pos = _PREFIX.size
    raw_header: Blob = memoryview(data)[pos : pos + header_len]
    if flags & FLAG_ZLIB_HEADER:
        raw_header = _inflate(raw_header, MAX_HEADER_BYTES, "header")  # at most 1 MiB, as a plain one
    header = parse_header(bytes(raw_header), KINDS, MAX_TENSORS)
    pos += header_len
    (payload_len,) = _U32.unpack_from(data, pos)
    pos += 4
    if pos + payload_len + 4 != len(data):
        raise MalformedMessage(f"payload length {payload_len} disagrees with the message size")
    entries = _entries(header["tensors"])
    total_elements = sum(math.prod(e.shape) for e in entries)
    if total_elements > MAX_ELEMENTS:
        raise MalformedMessage(
            f"message declares {total_elements} elements, over the limit of {MAX_ELEMENTS}"
        )
    if expected is not None:
        check_against({e.name: TensorSpec(e.shape, e.dtype_name) for e in entries}, expected)
    payload: Blob = memoryview(data)[pos : pos + payload_len]  # no copy: decoders copy out
    declared = sum(e.nbytes for e in entries)
    if flags & FLAG_ZLIB:
        payload = _inflate(payload, declared)
    if len(payload) != declared:
        raise MalformedMessage(f"payload holds {len(payload)} bytes but tensors declare {declared}")
    tensors = _decode_uniform_dense(entries, payload)
    if tensors is not None:
        return TensorMessage(header["kind"], header["meta"], tensors, len(data), {e.name: "dense" for e in entries})
    tensors = {}
    offset = 0
    for e in entries:
        blob = payload[offset : offset + e.nbytes]
        offset += e.nbytes
        try:
            tensors[e.name] = e.encoding.decode(e.fields, blob, e.shape, e.dtype)
        except ProtocolError as exc:
            raise type(exc)(f"tensor {e.name!r}: {exc}") from None
        except (ValueError, TypeError, KeyError, OverflowError, IndexError) as exc:
            raise MalformedMessage(f"tensor {e.name!r}: {exc}") from None
    encodings = {e.name: e.encoding.name for e in entries}
    return TensorMessage(header["kind"], header["meta"], tensors, len(data), encodings)


def _entries(raw: list[Any]) -> list[_Entry]:
    """The validated entries of a header's tensor list, short lists remembered by their
    ``repr``: it tells apart every value parsed JSON can hold (1, 1.0, true, "1", null), so
    equal keys are equal lists, which pass or fail alike (only passing ones are kept).
    Entries are never mutated after validation."""
    key = repr(raw)
    short = len(key) <= _REMEMBER_MAX_CHARS
    hit = _ENTRIES.get(key) if short else None
    if hit is not None:
        return hit
    seen: set[str] = set()
    entries = [_check_entry(e, seen) for e in raw]
    if short:
        _ENTRIES.put(key, entries)
    return entries


def _decode_uniform_dense(entries: list[_Entry], payload: Blob) -> dict[str, np.ndarray] | None:
    """Every tensor dense and of one dtype (an uncompressed model or update): one read, one
    finiteness check and one copy for the whole payload, each tensor a view of its part.
    None when the message is not like that, or holds NaN/Inf: the per-tensor path then
    decodes it, or names the tensor at fault."""
    if not entries or any(e.encoding.name != "dense" or e.dtype != entries[0].dtype for e in entries):
        return None
    dtype = entries[0].dtype
    if any(e.nbytes != math.prod(e.shape) * dtype.itemsize for e in entries):
        return None
    flat = np.frombuffer(payload, dtype=dtype)
    if dtype.kind == "f" and not np.isfinite(flat).all():
        return None
    flat = flat.astype(dtype.newbyteorder("="), copy=True)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for e in entries:
        count = e.nbytes // dtype.itemsize
        out[e.name] = flat[offset : offset + count].reshape(e.shape)
        offset += count
    return out


def _inflate(payload: Blob, limit: int, what: str = "payload") -> bytes:
    """Decompress at most ``limit`` bytes: a compression bomb stops at the limit, and the
    limit itself is bounded by the (already checked) shapes, or MAX_HEADER_BYTES."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise MalformedMessage(f"{what} does not inflate: {exc}") from None
    if len(out) > limit or d.unconsumed_tail or not d.eof or d.unused_data:
        if what == "header":
            raise MalformedMessage(f"compressed header is not one zlib stream of at most {limit} bytes")
        raise MalformedMessage("compressed payload does not inflate to the declared size")
    return out


def check_against(tensors: Mapping[str, np.ndarray | TensorSpec], expected: Mapping[str, TensorSpec]) -> None:
    """Names, shapes and dtypes must equal ``expected`` exactly."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ShapeMismatch(f"tensor names differ from the model: missing {missing}, unexpected {extra}")
    for name, spec in expected.items():
        got = tensors[name]
        shape, dtype = (got.shape, got.dtype) if isinstance(got, TensorSpec) else (got.shape, got.dtype.name)
        if tuple(shape) != tuple(spec.shape) or dtype != spec.dtype:
            raise ShapeMismatch(
                f"tensor {name!r}: got {dtype}{list(shape)}, expected {spec.dtype}{list(spec.shape)}"
            )
