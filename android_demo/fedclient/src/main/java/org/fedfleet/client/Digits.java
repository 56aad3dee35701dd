package org.fedfleet.client;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * 8x8 digits in the text format {@code tools/make_resources.py} writes: {@code label:64 pixels},
 * each pixel 0..16 as one of "0123456789abcdefg", scaled by 1/16 as the Python loader scales
 * sklearn's digits, so Java and Python phones train on the same features.
 */
public final class Digits {
  public static final String RESOURCE = "/org/fedfleet/client/digits.txt";
  private static final String PIXELS = "0123456789abcdefg";

  private Digits() {}

  /** The bundled class-balanced sample (600 training-split digits). */
  public static Dataset bundled() throws IOException {
    try (InputStream in = Digits.class.getResourceAsStream(RESOURCE)) {
      if (in == null) {
        throw new IOException(RESOURCE + " is not on the class path");
      }
      return read(in);
    }
  }

  public static Dataset read(InputStream in) throws IOException {
    List<float[]> xs = new ArrayList<>();
    List<Integer> ys = new ArrayList<>();
    BufferedReader r = new BufferedReader(new InputStreamReader(in, StandardCharsets.US_ASCII));
    for (String line; (line = r.readLine()) != null; ) {
      if (line.trim().isEmpty() || line.startsWith("#")) {
        continue;
      }
      int colon = line.indexOf(':');
      String pixels = line.substring(colon + 1);
      if (colon < 1 || pixels.length() != 64) {
        throw new IOException("bad digits line: " + line);
      }
      float[] x = new float[64];
      for (int i = 0; i < 64; i++) {
        int v = PIXELS.indexOf(pixels.charAt(i));
        if (v < 0) {
          throw new IOException("bad pixel '" + pixels.charAt(i) + "' in: " + line);
        }
        x[i] = v / 16.0f;
      }
      xs.add(x);
      ys.add(Integer.parseInt(line.substring(0, colon)));
    }
    return new Dataset(xs.toArray(new float[0][]), ys.stream().mapToInt(Integer::intValue).toArray());
  }

  /** One line of the format (the Android app stores drawn digits this way). */
  public static String line(int label, float[] pixels) {
    StringBuilder sb = new StringBuilder().append(label).append(':');
    for (float p : pixels) {
      sb.append(PIXELS.charAt(Math.max(0, Math.min(16, Math.round(p * 16)))));
    }
    return sb.toString();
  }
}
