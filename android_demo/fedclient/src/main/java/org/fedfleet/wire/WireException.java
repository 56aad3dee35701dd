package org.fedfleet.wire;

/**
 * A message was refused. {@link #reason()} is one of the reasons of FORMAT.md section 8, the
 * same string the Python reference puts in {@code ProtocolError.reason} and the server in its
 * 400 answer, so a phone and the server always agree on why a message is bad.
 */
public final class WireException extends Exception {
  private static final long serialVersionUID = 1L;

  /** FORMAT.md section 8, in the order the checks run. */
  public enum Reason {
    MALFORMED("malformed"),
    CHECKSUM("checksum"),
    UNSUPPORTED_VERSION("unsupported_version"),
    UNSUPPORTED_ENCODING("unsupported_encoding"),
    SHAPE_MISMATCH("shape_mismatch"),
    NON_FINITE("non_finite");

    final String wire;

    Reason(String wire) {
      this.wire = wire;
    }
  }

  private final Reason reason;

  public WireException(Reason reason, String message) {
    super(message);
    this.reason = reason;
  }

  /** The reason as it is spelled on the wire, e.g. {@code "checksum"}. */
  public String reason() {
    return reason.wire;
  }

  public Reason kind() {
    return reason;
  }

  static WireException malformed(String message) {
    return new WireException(Reason.MALFORMED, message);
  }

  /** The same error with the tensor it happened in named first. */
  WireException in(String tensor) {
    return new WireException(reason, "tensor '" + tensor + "': " + getMessage());
  }
}
