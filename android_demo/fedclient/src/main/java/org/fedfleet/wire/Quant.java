package org.fedfleet.wire;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Map;
import java.util.Random;

/**
 * Uniform quantization with one max-norm scale per chunk (FORMAT.md section 4): the unbiased
 * stochastic quantizer of QSGD (Alistarh et al., 2017) or deterministic round-half-up. Every
 * step is one binary64 operation in the order FORMAT.md gives, so the codes equal Python's.
 */
public final class Quant {
  public static final int MAX_CHUNK = 1 << 24;

  private Quant() {}

  /** Scales (one per chunk) and codes (one per value, 0..2^bits - 1, as unsigned bytes). */
  public record Quantized(float[] scales, byte[] codes) {}

  public static int levels(int bits) {
    return (1 << bits) - 1;
  }

  public static int numChunks(long count, int chunk) {
    return (int) ((count + chunk - 1) / chunk);
  }

  public static long packedBytes(long count, int bits) {
    return (count * bits + 7) / 8;
  }

  /** Bytes of a quantized section: float32 scales, then packed codes. */
  public static long sectionBytes(long count, int bits, int chunk) {
    return 4L * numChunks(count, chunk) + packedBytes(count, bits);
  }

  /**
   * Quantizes float32 values; {@code rng} null means deterministic rounding, otherwise one
   * uniform draw per value, in order (also for values in an all-zero chunk, as numpy draws).
   */
  public static Quantized quantize(float[] x, int bits, int chunk, Random rng) {
    int n = x.length;
    int lv = levels(bits);
    float[] scales = new float[numChunks(n, chunk)];
    byte[] codes = new byte[n];
    for (int c = 0; c < scales.length; c++) {
      int start = c * chunk;
      int end = Math.min(n, start + chunk);
      float s = 0f;
      for (int i = start; i < end; i++) {
        s = Math.max(s, Math.abs(x[i])); // abs also makes -0.0 a +0.0 scale
      }
      scales[c] = s;
      for (int i = start; i < end; i++) {
        double r = rng == null ? 0.5 : rng.nextDouble();
        if (s == 0f) {
          continue; // an all-zero chunk has code 0 throughout
        }
        double t = (double) x[i] / s;
        double u = ((t + 1.0) * lv) * 0.5;
        // |x| <= s keeps u in [0, L]; u + r can still round up to L + 1 when r is within an ulp of 1
        codes[i] = (byte) Math.min((long) Math.floor(u + r), lv);
      }
    }
    return new Quantized(scales, codes);
  }

  /** x_hat = float32((s * (2q - L)) / L), computed in binary64: the decoder's formula. */
  public static float[] dequantize(float[] scales, byte[] codes, int bits, int chunk) {
    int lv = levels(bits);
    float[] out = new float[codes.length];
    for (int i = 0; i < out.length; i++) {
      double s = scales[i / chunk];
      out[i] = (float) ((s * (2.0 * (codes[i] & 0xff) - lv)) / lv);
    }
    return out;
  }

  public static byte[] encodeSection(Quantized q, int bits) {
    byte[] packed = pack(q.codes(), bits);
    ByteBuffer b = ByteBuffer.allocate(4 * q.scales().length + packed.length).order(ByteOrder.LITTLE_ENDIAN);
    for (float s : q.scales()) {
      b.putFloat(s);
    }
    return b.put(packed).array();
  }

  /** Scales then codes of {@code count} values, at {@code blob[off, off + len)}. */
  static float[] decodeSection(byte[] blob, int off, int len, int count, int bits, int chunk) throws WireException {
    long need = sectionBytes(count, bits, chunk);
    if (len != need) {
      throw WireException.malformed(count + " values at " + bits + " bits in chunks of " + chunk + " need "
          + need + " bytes, got " + len);
    }
    ByteBuffer b = ByteBuffer.wrap(blob, off, len).order(ByteOrder.LITTLE_ENDIAN);
    float[] scales = new float[numChunks(count, chunk)];
    for (int c = 0; c < scales.length; c++) {
      int raw = b.getInt();
      scales[c] = Float.intBitsToFloat(raw);
      if (Float.isNaN(scales[c]) || Float.isInfinite(scales[c])) {
        throw new WireException(WireException.Reason.NON_FINITE, "quantization scale is NaN or Inf");
      }
      if (raw < 0) {
        throw WireException.malformed("quantization scales must be non-negative (sign bit clear)");
      }
    }
    byte[] codes = unpack(blob, off + 4 * scales.length, len - 4 * scales.length, count, bits);
    return dequantize(scales, codes, bits, chunk);
  }

  /** Code i at bit (i*bits) mod 8 of byte (i*bits)/8, least significant bits first. */
  public static byte[] pack(byte[] codes, int bits) {
    byte[] out = new byte[(int) packedBytes(codes.length, bits)];
    for (int i = 0; i < codes.length; i++) {
      long bit = (long) i * bits;
      out[(int) (bit >>> 3)] |= (byte) ((codes[i] & 0xff) << (bit & 7));
    }
    return out;
  }

  /** Inverse of {@link #pack}; padding bits after the last code must be zero. */
  static byte[] unpack(byte[] blob, int off, int len, int count, int bits) throws WireException {
    if (len != packedBytes(count, bits)) {
      throw WireException.malformed(count + " codes of " + bits + " bits need " + packedBytes(count, bits)
          + " bytes, got " + len);
    }
    int mask = (1 << bits) - 1;
    byte[] codes = new byte[count];
    for (int i = 0; i < count; i++) {
      long bit = (long) i * bits;
      codes[i] = (byte) (((blob[off + (int) (bit >>> 3)] & 0xff) >>> (bit & 7)) & mask);
    }
    long used = (long) count * bits;
    if (len > 0 && (used & 7) != 0 && ((blob[off + len - 1] & 0xff) >>> (used & 7)) != 0) {
      throw WireException.malformed("padding bits after the last code must be zero");
    }
    return codes;
  }

  /** The "bits" and "chunk" header keys of a quantized section, checked. */
  static int[] params(Map<String, Object> fields) throws WireException {
    Object bits = fields.get("bits");
    Object chunk = fields.get("chunk");
    if (!(bits instanceof Long b) || (b != 1 && b != 2 && b != 4 && b != 8)) {
      throw WireException.malformed("bits must be one of [1, 2, 4, 8], got " + bits);
    }
    if (!(chunk instanceof Long c) || c < 1 || c > MAX_CHUNK) {
      throw WireException.malformed("chunk must be an int in [1, " + MAX_CHUNK + "], got " + chunk);
    }
    return new int[] {b.intValue(), c.intValue()};
  }
}
