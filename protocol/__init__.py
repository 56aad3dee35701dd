"""fedfleet's wire protocol: the one place where tensors become bytes and back.

Imported by the server, the device runtime and the CLI; imports neither of them.
The format is specified in ``protocol/FORMAT.md`` so that other languages (the Java
client in ``android_demo/fedclient`` and the web phone) implement the same bytes.

Phones encode updates with ``UpdateEncoder`` (``protocol.codec``); the server decodes
any of them with ``decode_message``. Privacy accounting is in ``protocol.privacy``
(imported on demand: it pulls in dp_accounting and scipy).
"""

from fedfleet.protocol.codec import EncoderConfig, UpdateEncoder, dense_float32_nbytes
from fedfleet.protocol.errors import (
    ChecksumMismatch,
    MalformedMessage,
    NonFiniteValues,
    ProtocolError,
    ShapeMismatch,
    UnsupportedEncoding,
    UnsupportedVersion,
)
from fedfleet.protocol.meta import UPDATE_META_KEYS, check_update_meta
from fedfleet.protocol.wire import (
    FORMAT_VERSION,
    MAGIC,
    TensorMessage,
    TensorSpec,
    decode_message,
    encode_message,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "UPDATE_META_KEYS",
    "ChecksumMismatch",
    "EncoderConfig",
    "MalformedMessage",
    "NonFiniteValues",
    "ProtocolError",
    "ShapeMismatch",
    "TensorMessage",
    "TensorSpec",
    "UnsupportedEncoding",
    "UnsupportedVersion",
    "UpdateEncoder",
    "check_update_meta",
    "decode_message",
    "dense_float32_nbytes",
    "encode_message",
]
