package org.fedfleet.codec;

/** The update holds NaN or Inf: it is never sent (the server would refuse it with non_finite). */
public final class NonFiniteUpdateException extends IllegalArgumentException {
  private static final long serialVersionUID = 1L;

  public NonFiniteUpdateException(String message) {
    super(message);
  }
}
