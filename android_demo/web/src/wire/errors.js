// Named decoding errors of wire format v1 (protocol/FORMAT.md section 8). Each carries the
// `reason` the Python reference uses (protocol/errors.py), so both sides report alike.

export class ProtocolError extends Error {
  static reason = "malformed";

  get reason() {
    return this.constructor.reason;
  }
}

export class MalformedMessage extends ProtocolError {
  static reason = "malformed";
}

export class ChecksumMismatch extends ProtocolError {
  static reason = "checksum";
}

export class UnsupportedVersion extends ProtocolError {
  static reason = "unsupported_version";
}

export class UnsupportedEncoding extends ProtocolError {
  static reason = "unsupported_encoding";
}

export class ShapeMismatch extends ProtocolError {
  static reason = "shape_mismatch";
}

export class NonFiniteValues extends ProtocolError {
  static reason = "non_finite";
}
