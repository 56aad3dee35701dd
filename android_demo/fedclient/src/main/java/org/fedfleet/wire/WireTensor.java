package org.fedfleet.wire;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * One tensor as it goes on the wire: its header fields and its encoded blob. {@code fields} are
 * the encoding's own keys, in the order FORMAT.md section 3 lists them (insertion order kept).
 */
public record WireTensor(String name, DType dtype, int[] shape, String encoding, Map<String, Object> fields,
                         byte[] blob) {
  public static WireTensor dense(Tensor t) {
    return new WireTensor(t.name(), t.dtype(), t.shape(), "dense", new LinkedHashMap<>(), t.rawBytes());
  }
}
