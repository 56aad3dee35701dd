package org.fedfleet.wire;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Map;
import java.util.Set;

/**
 * The per-tensor encodings "dense", "quant" and "sparse" (FORMAT.md section 3), decode side.
 * As in Python, decoding runs in two phases so nothing is allocated before the header is
 * trusted: {@link #nbytesRange} checks an entry's own keys and bounds its payload size; {@link
 * #decode} then checks the bytes. Every encoding decodes to a dense tensor of the entry's dtype.
 */
final class Encodings {
  static final Set<String> NAMES = Sets.of("dense", "quant", "sparse");

  private Encodings() {}

  /** One header entry, already checked by {@link #nbytesRange}. */
  record Entry(String name, DType dtype, int[] shape, int size, String encoding, Map<String, Object> fields,
               long nbytes) {}

  /** The [min, max] payload bytes the entry's keys allow; rejects unknown or ill-typed keys. */
  static long[] nbytesRange(String encoding, Map<String, Object> fields, long size, DType dtype)
      throws WireException {
    switch (encoding) {
      case "dense" -> {
        onlyKeys(fields, Sets.of(), encoding);
        return new long[] {size * dtype.itemSize, size * dtype.itemSize};
      }
      case "quant" -> {
        onlyKeys(fields, Sets.of("bits", "chunk"), encoding);
        needFloat32(dtype, encoding);
        int[] p = Quant.params(fields);
        long n = Quant.sectionBytes(size, p[0], p[1]);
        return new long[] {n, n};
      }
      default -> {
        needFloat32(dtype, encoding);
        Sparse s = sparseParams(fields, size);
        long values = s.valueBytes();
        if (s.bitmap) {
          return new long[] {values + (size + 7) / 8, values + (size + 7) / 8};
        }
        return new long[] {values + s.nnz, values + (long) IndexCoding.MAX_VARINT_BYTES * s.nnz};
      }
    }
  }

  static Tensor decode(Entry e, byte[] payload, int off) throws WireException {
    int len = (int) e.nbytes();
    return switch (e.encoding()) {
      case "dense" -> decodeDense(e, payload, off, len);
      case "quant" -> {
        int[] p = Quant.params(e.fields());
        yield Tensor.ofFloats(e.name(), e.shape(), Quant.decodeSection(payload, off, len, e.size(), p[0], p[1]));
      }
      default -> decodeSparse(e, payload, off, len);
    };
  }

  private static Tensor decodeDense(Entry e, byte[] payload, int off, int len) throws WireException {
    byte[] data = new byte[len];
    System.arraycopy(payload, off, data, 0, len);
    Tensor t = Tensor.ofBytes(e.name(), e.dtype(), e.shape(), data);
    if (e.dtype().isFloat) {
      for (double v : t.doubles()) {
        if (Double.isNaN(v) || Double.isInfinite(v)) {
          throw new WireException(WireException.Reason.NON_FINITE, "tensor contains NaN or Inf");
        }
      }
    }
    return t;
  }

  private static Tensor decodeSparse(Entry e, byte[] payload, int off, int len) throws WireException {
    int size = e.size();
    Sparse s = sparseParams(e.fields(), size);
    long split = len - s.valueBytes();
    if (split < 0) {
      throw WireException.malformed("sparse tensor is shorter than its values section");
    }
    int[] indices;
    if (s.bitmap) {
      if (split != (size + 7) / 8) {
        throw WireException.malformed("bitmap for " + size + " elements needs " + (size + 7) / 8 + " bytes, got " + split);
      }
      indices = IndexCoding.decodeBitmap(payload, off, (int) split, size, s.nnz);
    } else {
      indices = IndexCoding.decodeVarints(payload, off, (int) split, size, s.nnz);
    }
    int vOff = off + (int) split;
    float[] values;
    if (s.bits == 32) {
      values = new float[s.nnz];
      ByteBuffer b = ByteBuffer.wrap(payload, vOff, 4 * s.nnz).order(ByteOrder.LITTLE_ENDIAN);
      for (int i = 0; i < s.nnz; i++) {
        values[i] = b.getFloat();
        if (Float.isNaN(values[i]) || Float.isInfinite(values[i])) {
          throw new WireException(WireException.Reason.NON_FINITE, "sparse values contain NaN or Inf");
        }
      }
    } else {
      values = Quant.decodeSection(payload, vOff, len - (int) split, s.nnz, s.bits, s.chunk);
    }
    float[] out = new float[size]; // +0.0 everywhere not sent
    for (int i = 0; i < indices.length; i++) {
      out[indices[i]] = values[i];
    }
    return Tensor.ofFloats(e.name(), e.shape(), out);
  }

  private record Sparse(int nnz, boolean bitmap, int bits, int chunk) {
    long valueBytes() {
      return bits == 32 ? 4L * nnz : Quant.sectionBytes(nnz, bits, chunk);
    }
  }

  private static Sparse sparseParams(Map<String, Object> fields, long size) throws WireException {
    Object nnz = fields.get("nnz");
    Object index = fields.get("index");
    if (!(nnz instanceof Long k) || k < 0 || k > size) {
      throw WireException.malformed("nnz must be an int in [0, " + size + "], got " + nnz);
    }
    if (!"bitmap".equals(index) && !"varint".equals(index)) {
      throw WireException.malformed("index must be one of [bitmap, varint], got " + index);
    }
    if (Long.valueOf(32).equals(fields.get("bits"))) {
      onlyKeys(fields, Sets.of("nnz", "index", "bits"), "sparse");
      return new Sparse(k.intValue(), "bitmap".equals(index), 32, 0);
    }
    onlyKeys(fields, Sets.of("nnz", "index", "bits", "chunk"), "sparse");
    int[] p = Quant.params(fields);
    return new Sparse(k.intValue(), "bitmap".equals(index), p[0], p[1]);
  }

  private static void onlyKeys(Map<String, Object> fields, Set<String> allowed, String encoding) throws WireException {
    for (String key : fields.keySet()) {
      if (!allowed.contains(key)) {
        throw WireException.malformed("encoding '" + encoding + "' does not define header key '" + key + "'");
      }
    }
  }

  private static void needFloat32(DType dtype, String encoding) throws WireException {
    if (dtype != DType.FLOAT32) {
      throw WireException.malformed("encoding '" + encoding + "' carries float32 tensors only, not " + dtype.wireName);
    }
  }
}
