"""Named errors raised by decoders. Each maps to one 4xx reason on the server."""


class ProtocolError(ValueError):
    """Base of every error a decoder may raise on untrusted bytes."""

    reason = "malformed"


class MalformedMessage(ProtocolError):
    reason = "malformed"


class ChecksumMismatch(ProtocolError):
    reason = "checksum"


class UnsupportedVersion(ProtocolError):
    reason = "unsupported_version"


class UnsupportedEncoding(ProtocolError):
    reason = "unsupported_encoding"


class ShapeMismatch(ProtocolError):
    reason = "shape_mismatch"


class NonFiniteValues(ProtocolError):
    reason = "non_finite"
