package org.fedfleet.client;

import java.io.IOException;

/** The server refused a request; {@code status} and {@code reason} come from its JSON answer. */
public class ServerException extends IOException {
  private static final long serialVersionUID = 1L;
  public final int status;
  public final String reason;

  public ServerException(int status, String reason, String message) {
    super(status + " " + reason + ": " + message);
    this.status = status;
    this.reason = reason;
  }
}
