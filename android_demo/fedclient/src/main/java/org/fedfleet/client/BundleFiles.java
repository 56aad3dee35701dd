package org.fedfleet.client;

import java.io.IOException;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Collections;
import org.json.JSONObject;

/**
 * Bundle downloads ({@code GET /v1/bundle/{file}}, export/bundle.py): every file is checked
 * against the sha256 that {@code manifest.json} lists under {@code artifacts.{file}.sha256}
 * (export/manifest.py) before it is used. A file the manifest marks unavailable (the exporter
 * records the op and reason) or whose hash differs is a {@link BundleException}.
 */
final class BundleFiles {
  private final Http http;

  BundleFiles(Http http) {
    this.http = http;
  }

  JSONObject manifest() throws IOException {
    JSONObject manifest = Answers.object(get("manifest.json"));
    if (Answers.integer(manifest, "format_version") != 1) {
      throw new BundleException("bundle format_version " + manifest.opt("format_version") + "; this client reads 1");
    }
    return manifest;
  }

  byte[] download(String file) throws IOException {
    JSONObject info = Answers.child(manifest(), "artifacts").optJSONObject(file);
    if (info == null || !info.optBoolean("available", false)) {
      throw new BundleException(file + " is not available in this bundle"
          + (info == null ? "" : ": " + info.optString("reason", "")));
    }
    String expected = Answers.string(info, "sha256");
    byte[] data = get(file);
    String actual = sha256(data);
    if (!actual.equalsIgnoreCase(expected)) {
      throw new BundleException(file + ": sha256 " + actual + " != manifest " + expected);
    }
    return data;
  }

  private byte[] get(String file) throws IOException {
    return http.send("GET", "/v1/bundle/" + file, null, null, Collections.emptyMap(), true).body();
  }

  static String sha256(byte[] data) {
    try {
      StringBuilder sb = new StringBuilder();
      for (byte b : MessageDigest.getInstance("SHA-256").digest(data)) {
        sb.append(String.format("%02x", b));
      }
      return sb.toString();
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException(e); // every Java platform has SHA-256
    }
  }
}
