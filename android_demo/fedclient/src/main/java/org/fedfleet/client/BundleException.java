package org.fedfleet.client;

import java.io.IOException;

/** A bundle file was not listed, not available, or did not hash to the manifest's sha256. */
public final class BundleException extends IOException {
  private static final long serialVersionUID = 1L;

  public BundleException(String message) {
    super(message);
  }
}
