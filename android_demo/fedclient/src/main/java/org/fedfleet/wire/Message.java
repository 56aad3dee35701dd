package org.fedfleet.wire;

import java.util.Map;

/**
 * A decoded message: kind ("model" or "update"), meta as parsed (Long/Double/String/...),
 * tensors by name in header order, its size on the wire, and each tensor's encoding.
 */
public record Message(String kind, Map<String, Object> meta, Map<String, Tensor> tensors, int wireBytes,
                      Map<String, String> encodings) {}
