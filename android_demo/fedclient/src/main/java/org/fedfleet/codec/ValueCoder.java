package org.fedfleet.codec;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Random;
import org.fedfleet.wire.Quant;

/**
 * Step 5: the values kept, as float32 or quantized (FORMAT.md section 4). Returns the bytes,
 * their header fields, and the float32 values the server will decode (error feedback keeps
 * what they miss).
 */
final class ValueCoder {
  /** Encoded values: blob, own header keys in FORMAT.md order, and what they decode to. */
  record Section(byte[] blob, Map<String, Object> fields, float[] decoded) {}

  final int bits; // 32 = float32
  private final int chunk;
  private final boolean stochastic;

  ValueCoder(int bits, int chunk, boolean stochastic) {
    this.bits = bits;
    this.chunk = chunk;
    this.stochastic = stochastic;
  }

  Section encode(double[] values, Random rng) {
    float[] x32 = new float[values.length];
    for (int i = 0; i < x32.length; i++) {
      x32[i] = (float) values[i]; // round to nearest even, as numpy's astype(float32)
    }
    Map<String, Object> fields = new LinkedHashMap<>();
    if (bits == 32) {
      ByteBuffer b = ByteBuffer.allocate(4 * x32.length).order(ByteOrder.LITTLE_ENDIAN);
      for (float v : x32) {
        b.putFloat(v);
      }
      return new Section(b.array(), fields, x32);
    }
    Quant.Quantized q = Quant.quantize(x32, bits, chunk, stochastic ? rng : null);
    fields.put("bits", bits);
    fields.put("chunk", chunk);
    return new Section(Quant.encodeSection(q, bits), fields, Quant.dequantize(q.scales(), q.codes(), bits, chunk));
  }
}
