"""The framing of a gossip message (docs/gossip.md): a wire-format message (protocol/FORMAT.md)
whose JSON header is sent as a zlib stream (flag bit 1) whenever that is shorter.

A gossip message of a 1% top-k step holds a few hundred bytes of values and indices under about
900 bytes of header (each tensor's name, dtype, shape, encoding and sizes); the header is repetitive
JSON and shrinks about 3.5x. The payload is left as the codec wrote it: quantized codes and varint
gaps do not compress, and zlib over them would add its own framing. Gossip messages travel only
between Python phones through the relay, whose decoder reads the flag like any other; the bytes
of the tensors are unchanged, so the decoded message is the same.
"""

from __future__ import annotations

import struct
import zlib

from fedfleet.protocol.wire import FLAG_ZLIB_HEADER, MAGIC, frame

_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header_len (FORMAT.md section 1)
_U32 = struct.Struct("<I")


def compact(message: bytes) -> bytes:
    """``message`` with its header zlib-compressed (level 9) when that is shorter; otherwise, or when
    the header already is compressed, ``message`` itself. ``message`` comes from this phone's own
    encoder (a well-formed wire message); anything else is a bug, and raises ValueError."""
    if len(message) < _PREFIX.size + 2 * _U32.size:
        raise ValueError(f"not a wire message: {len(message)} bytes")
    magic, version, flags, header_len = _PREFIX.unpack_from(message, 0)
    if magic != MAGIC:
        raise ValueError(f"not a wire message: magic {magic!r}")
    if flags & FLAG_ZLIB_HEADER:
        return message
    start = _PREFIX.size
    header = message[start:start + header_len]
    (payload_len,) = _U32.unpack_from(message, start + header_len)
    payload_start = start + header_len + _U32.size
    if len(message) != payload_start + payload_len + _U32.size:
        raise ValueError(f"not a wire message: {len(message)} bytes, its fields say "
                         f"{payload_start + payload_len + _U32.size}")
    packed = zlib.compress(header, 9)
    if len(packed) >= len(header):
        return message
    payload = message[payload_start:payload_start + payload_len]
    return frame(packed, payload, flags=flags | FLAG_ZLIB_HEADER, version=version)
