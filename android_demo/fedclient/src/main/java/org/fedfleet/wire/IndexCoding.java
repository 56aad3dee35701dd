package org.fedfleet.wire;

/**
 * Index sections of sparse tensors (FORMAT.md section 5): a bitmap of n bits, or the gaps
 * between strictly increasing indices as LEB128 varints. Decoders accept exactly one byte
 * form per index set (shortest varints, zero padding), so a message cannot be re-encoded in
 * a second way that a cache or a signature would treat as different.
 */
public final class IndexCoding {
  static final int MAX_VARINT_BYTES = 4; // indices < 2^28, so a gap needs at most 4 groups of 7 bits

  private IndexCoding() {}

  public static byte[] bitmap(int[] indices, int size) {
    byte[] out = new byte[(size + 7) / 8];
    for (int i : indices) {
      out[i >>> 3] |= (byte) (1 << (i & 7));
    }
    return out;
  }

  static int[] decodeBitmap(byte[] blob, int off, int len, int size, int nnz) throws WireException {
    byte[] bits = Quant.unpack(blob, off, len, size, 1);
    int[] out = new int[nnz];
    int k = 0;
    for (int i = 0; i < size; i++) {
      if (bits[i] != 0) {
        if (k == nnz) {
          throw WireException.malformed("bitmap has more set bits than nnz " + nnz);
        }
        out[k++] = i;
      }
    }
    if (k != nnz) {
      throw WireException.malformed("bitmap has " + k + " set bits but nnz is " + nnz);
    }
    return out;
  }

  public static int varintBytes(int[] indices) {
    int total = 0;
    int prev = 0;
    for (int i = 0; i < indices.length; i++) {
      int gap = i == 0 ? indices[0] : indices[i] - prev;
      prev = indices[i];
      total += gap < 1 << 7 ? 1 : gap < 1 << 14 ? 2 : gap < 1 << 21 ? 3 : 4;
    }
    return total;
  }

  public static byte[] varints(int[] indices) {
    byte[] out = new byte[varintBytes(indices)];
    int pos = 0;
    int prev = 0;
    for (int i = 0; i < indices.length; i++) {
      int gap = i == 0 ? indices[0] : indices[i] - prev;
      prev = indices[i];
      while (gap >= 0x80) {
        out[pos++] = (byte) ((gap & 0x7f) | 0x80);
        gap >>>= 7;
      }
      out[pos++] = (byte) gap;
    }
    return out;
  }

  static int[] decodeVarints(byte[] blob, int off, int len, int size, int nnz) throws WireException {
    int[] out = new int[nnz];
    int k = 0;
    long index = 0;
    int pos = off;
    int end = off + len;
    while (pos < end) {
      if (k == nnz) {
        throw WireException.malformed("index section does not hold exactly " + nnz + " varints");
      }
      long gap = 0;
      int n = 0;
      int b;
      do {
        if (pos >= end) {
          throw WireException.malformed("index section does not hold exactly " + nnz + " varints");
        }
        if (n == MAX_VARINT_BYTES) {
          throw WireException.malformed("varint longer than " + MAX_VARINT_BYTES + " bytes");
        }
        b = blob[pos++] & 0xff;
        gap |= (long) (b & 0x7f) << (7 * n++);
      } while ((b & 0x80) != 0);
      if (n > 1 && b == 0) {
        throw WireException.malformed("varint is not in its shortest form");
      }
      if (k > 0 && gap == 0) {
        throw WireException.malformed("indices must be strictly increasing (a gap of 0 repeats an index)");
      }
      index += gap;
      if (index >= size) {
        throw WireException.malformed("index " + index + " is out of range for " + size + " elements");
      }
      out[k++] = (int) index;
    }
    if (k != nnz) {
      throw WireException.malformed("index section does not hold exactly " + nnz + " varints");
    }
    return out;
  }
}
