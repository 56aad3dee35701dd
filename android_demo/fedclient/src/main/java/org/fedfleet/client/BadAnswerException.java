package org.fedfleet.client;

import java.io.IOException;

/**
 * The server's answer could not be used: not JSON, a key missing or of the wrong type, an
 * unknown action, a model message that does not decode. Nothing of it was acted on.
 */
public final class BadAnswerException extends IOException {
  private static final long serialVersionUID = 1L;

  public BadAnswerException(String message) {
    super("unusable answer from the server: " + message);
  }

  public BadAnswerException(String message, Throwable cause) {
    super("unusable answer from the server: " + message, cause);
  }
}
