package org.fedfleet.wire;

import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;

/**
 * The canonical header JSON of FORMAT.md section 2: no whitespace, ASCII only with lowercase
 * {@code \\uXXXX} escapes, {@code meta} keys sorted by code point at every depth, other objects
 * in the order given, integers within +-(2^53 - 1), floats as Python's {@code repr}.
 *
 * <p>Accepted values: null, Boolean, String, Integer/Long/Short/Byte (integers), Float/Double
 * (floats: a Float is widened, and stays a float on the wire), Map with String keys, List or
 * other Collection, int[] and long[] (lists of integers).
 */
public final class CanonicalJson {
  static final long MAX_SAFE_INT = (1L << 53) - 1; // beyond this, JavaScript numbers lose integers

  private CanonicalJson() {}

  /** {@code {"kind":K,"meta":M,"tensors":[...]}} with entries in the order given. */
  public static String header(String kind, Map<String, ?> meta, List<? extends Map<String, ?>> entries) {
    StringBuilder sb = new StringBuilder("{\"kind\":");
    string(sb, kind);
    sb.append(",\"meta\":");
    value(sb, meta, true, "meta");
    sb.append(",\"tensors\":");
    value(sb, entries, false, "tensors");
    return sb.append('}').toString();
  }

  /** One value; with {@code sortKeys}, object keys sorted by code point (meta's rule). */
  public static String write(Object v, boolean sortKeys) {
    StringBuilder sb = new StringBuilder();
    value(sb, v, sortKeys, "value");
    return sb.toString();
  }

  private static void value(StringBuilder sb, Object v, boolean sortKeys, String path) {
    if (v == null) {
      sb.append("null");
    } else if (v instanceof Boolean b) {
      sb.append(b ? "true" : "false");
    } else if (v instanceof String s) {
      string(sb, s);
    } else if (v instanceof Integer || v instanceof Long || v instanceof Short || v instanceof Byte) {
      long n = ((Number) v).longValue();
      if (Math.abs(n) > MAX_SAFE_INT) {
        throw new IllegalArgumentException(path + ": integer " + n + " is outside +-(2**53 - 1)");
      }
      sb.append(n);
    } else if (v instanceof Double || v instanceof Float) {
      sb.append(PyFloat.repr(((Number) v).doubleValue()));
    } else if (v instanceof Map<?, ?> m) {
      object(sb, m, sortKeys, path);
    } else if (v instanceof Collection<?> c) {
      sb.append('[');
      int i = 0;
      for (Object item : c) {
        if (i > 0) {
          sb.append(',');
        }
        value(sb, item, sortKeys, path + "[" + i++ + "]");
      }
      sb.append(']');
    } else if (v instanceof int[] a) {
      List<Long> list = new ArrayList<>();
      for (int x : a) {
        list.add((long) x);
      }
      value(sb, list, sortKeys, path);
    } else if (v instanceof long[] a) {
      List<Long> list = new ArrayList<>();
      for (long x : a) {
        list.add(x);
      }
      value(sb, list, sortKeys, path);
    } else {
      throw new IllegalArgumentException(path + ": " + v.getClass().getSimpleName() + " cannot go into the JSON header");
    }
  }

  private static void object(StringBuilder sb, Map<?, ?> m, boolean sortKeys, String path) {
    List<String> keys = new ArrayList<>();
    for (Object k : m.keySet()) {
      if (!(k instanceof String s)) {
        throw new IllegalArgumentException(path + ": object keys must be strings");
      }
      keys.add(s);
    }
    if (sortKeys) {
      keys.sort(CanonicalJson::compareCodePoints);
    }
    sb.append('{');
    for (int i = 0; i < keys.size(); i++) {
      if (i > 0) {
        sb.append(',');
      }
      string(sb, keys.get(i));
      sb.append(':');
      value(sb, m.get(keys.get(i)), sortKeys, path + "." + keys.get(i));
    }
    sb.append('}');
  }

  /** Python's str order: by code point (String.compareTo is UTF-16 order, which differs above U+FFFF). */
  static int compareCodePoints(String a, String b) {
    int i = 0;
    int j = 0;
    while (i < a.length() && j < b.length()) {
      int ca = a.codePointAt(i);
      int cb = b.codePointAt(j);
      if (ca != cb) {
        return Integer.compare(ca, cb);
      }
      i += Character.charCount(ca);
      j += Character.charCount(cb);
    }
    return Integer.compare(a.length() - i, b.length() - j);
  }

  private static final char[] HEX = "0123456789abcdef".toCharArray();

  /** ASCII-only string: UTF-16 units outside U+0020..U+007E escaped (so pairs above U+FFFF). */
  static void string(StringBuilder sb, String s) {
    sb.append('"');
    for (int i = 0; i < s.length(); i++) {
      char c = s.charAt(i);
      switch (c) {
        case '"' -> sb.append("\\\"");
        case '\\' -> sb.append("\\\\");
        case '\n' -> sb.append("\\n");
        case '\r' -> sb.append("\\r");
        case '\t' -> sb.append("\\t");
        case '\b' -> sb.append("\\b");
        case '\f' -> sb.append("\\f");
        default -> {
          if (c >= 0x20 && c <= 0x7e) {
            sb.append(c);
          } else {
            sb.append("\\u").append(HEX[c >> 12 & 15]).append(HEX[c >> 8 & 15])
                .append(HEX[c >> 4 & 15]).append(HEX[c & 15]);
          }
        }
      }
    }
    sb.append('"');
  }
}
