package org.fedfleet.client;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The {@code manifest.json} of the bundle a phone ships with (export/manifest.py). Its
 * {@code model_fingerprint} (export.task_model.model_fingerprint: the sha256 of the model's tensor
 * names, shapes and dtypes) goes with the phone's registration, and the server refuses a phone
 * whose model is not the task's (409 {@code model_mismatch}).
 */
public final class BundleManifest {
  private BundleManifest() {}

  /** The manifest in {@code path}; a {@link BundleException} for anything but a format_version 1 object. */
  public static JSONObject read(Path path) throws IOException {
    JSONObject manifest;
    try {
      manifest = new JSONObject(new String(Files.readAllBytes(path), StandardCharsets.UTF_8));
    } catch (JSONException e) {
      throw new BundleException(path + ": not a JSON object: " + e.getMessage());
    }
    if (manifest.optInt("format_version", -1) != 1) {
      throw new BundleException(path + ": bundle format_version " + manifest.opt("format_version")
          + "; this client reads 1");
    }
    return manifest;
  }

  /** The manifest's model fingerprint (a {@link BundleException} when it has none). */
  public static String fingerprint(JSONObject manifest) throws BundleException {
    Object fp = manifest.opt("model_fingerprint");
    if (!(fp instanceof String) || ((String) fp).isEmpty()) {
      throw new BundleException("the bundle manifest has no model_fingerprint (export it again with fedfleet export)");
    }
    return (String) fp;
  }
}
