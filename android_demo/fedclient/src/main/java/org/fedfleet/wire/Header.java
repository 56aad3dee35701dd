package org.fedfleet.wire;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The header's checks (FORMAT.md sections 2, 3 and 7): the three top-level keys, then each
 * tensor entry in the reference decoder's order (the reason reported depends on it), then the
 * receiver's expected tensors. Nothing here looks at the payload.
 */
final class Header {
  private static final Set<String> HEADER_KEYS = Sets.of("kind", "meta", "tensors");
  private static final Set<String> COMMON_KEYS = Sets.of("name", "dtype", "shape", "encoding", "nbytes");

  private Header() {}

  static Map<String, Object> parse(byte[] raw) throws WireException {
    Object parsed = Json.parse(raw);
    if (!(parsed instanceof Map<?, ?> m) || m.size() != 3 || !m.keySet().containsAll(HEADER_KEYS)) {
      throw WireException.malformed("header must be an object with exactly the keys [kind, meta, tensors]");
    }
    if (!WireFormat.KINDS.contains(m.get("kind"))) {
      throw WireException.malformed("header.kind must be one of [update, model]");
    }
    if (!(m.get("meta") instanceof Map)) {
      throw WireException.malformed("header.meta must be an object");
    }
    if (!(m.get("tensors") instanceof List<?> t) || t.size() > WireFormat.MAX_TENSORS) {
      throw WireException.malformed("header.tensors must be a list of at most " + WireFormat.MAX_TENSORS + " entries");
    }
    @SuppressWarnings("unchecked")
    Map<String, Object> header = (Map<String, Object>) m;
    return header;
  }

  static List<Encodings.Entry> entries(List<?> raw) throws WireException {
    List<Encodings.Entry> out = new ArrayList<>();
    Set<String> seen = new HashSet<>();
    long total = 0;
    for (Object item : raw) {
      Encodings.Entry e = entry(item, seen);
      total += e.size();
      out.add(e);
    }
    if (total > WireFormat.MAX_ELEMENTS) {
      throw WireException.malformed("message declares " + total + " elements, over the limit of " + WireFormat.MAX_ELEMENTS);
    }
    return out;
  }

  /** One tensor entry, checked in the reference decoder's order (the reason reported depends on it). */
  private static Encodings.Entry entry(Object item, Set<String> seen) throws WireException {
    if (!(item instanceof Map<?, ?> raw)) {
      throw WireException.malformed("tensor entry must be an object");
    }
    if (!(raw.get("name") instanceof String name) || name.isEmpty()
        || name.codePointCount(0, name.length()) > WireFormat.MAX_NAME_LEN) {
      throw WireException.malformed("tensor name must be a string of 1.." + WireFormat.MAX_NAME_LEN + " characters");
    }
    if (!seen.add(name)) {
      throw WireException.malformed("tensor '" + name + "' appears twice");
    }
    int[] shape = shape(raw.get("shape"), name);
    if (!(raw.get("nbytes") instanceof Long nbytes) || nbytes < 0) {
      throw WireException.malformed("tensor '" + name + "': nbytes must be a non-negative int");
    }
    if (!(raw.get("encoding") instanceof String encoding) || !Encodings.NAMES.contains(encoding)) {
      throw new WireException(WireException.Reason.UNSUPPORTED_ENCODING,
          "tensor '" + name + "': unknown encoding " + raw.get("encoding"));
    }
    long size = 1;
    for (int d : shape) {
      size = Math.min(size * d, WireFormat.MAX_ELEMENTS + 1); // saturate: 8 dims of 2^28 overflow a long
    }
    if (size > WireFormat.MAX_ELEMENTS) {
      throw WireException.malformed("tensor '" + name + "' declares more than " + WireFormat.MAX_ELEMENTS + " elements");
    }
    Map<String, Object> fields = new LinkedHashMap<>();
    for (Map.Entry<?, ?> kv : raw.entrySet()) {
      if (!COMMON_KEYS.contains(kv.getKey())) {
        fields.put((String) kv.getKey(), kv.getValue());
      }
    }
    DType dtype;
    long[] range;
    try {
      dtype = DType.fromWire(raw.get("dtype"));
      range = Encodings.nbytesRange(encoding, fields, size, dtype);
    } catch (WireException ex) {
      throw ex.in(name);
    }
    if (nbytes < range[0] || nbytes > range[1]) {
      throw WireException.malformed("tensor '" + name + "': nbytes " + nbytes + " is outside [" + range[0] + ", "
          + range[1] + "] for its fields");
    }
    return new Encodings.Entry(name, dtype, shape, (int) size, encoding, fields, nbytes);
  }

  private static int[] shape(Object raw, String name) throws WireException {
    if (raw instanceof List<?> dims && dims.size() <= WireFormat.MAX_NDIM) {
      int[] shape = new int[dims.size()];
      for (int i = 0; i < shape.length; i++) {
        if (!(dims.get(i) instanceof Long d) || d < 0 || d > WireFormat.MAX_ELEMENTS) {
          shape = null;
          break;
        }
        shape[i] = (int) (long) d;
      }
      if (shape != null) {
        return shape;
      }
    }
    throw WireException.malformed("tensor '" + name + "': shape must be a list of at most " + WireFormat.MAX_NDIM
        + " non-negative ints");
  }

  static void checkAgainst(List<Encodings.Entry> entries, Map<String, TensorSpec> expected) throws WireException {
    Set<String> names = new HashSet<>();
    for (Encodings.Entry e : entries) {
      names.add(e.name());
    }
    if (!names.equals(expected.keySet())) {
      throw new WireException(WireException.Reason.SHAPE_MISMATCH,
          "tensor names differ from the model: got " + names + ", expected " + expected.keySet());
    }
    for (Encodings.Entry e : entries) {
      TensorSpec spec = expected.get(e.name());
      if (!spec.matches(e.shape(), e.dtype())) {
        throw new WireException(WireException.Reason.SHAPE_MISMATCH, "tensor '" + e.name() + "': got "
            + e.dtype().wireName + Arrays.toString(e.shape()) + ", expected " + spec);
      }
    }
  }
}
