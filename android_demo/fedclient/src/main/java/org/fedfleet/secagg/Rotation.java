package org.fedfleet.secagg;

import java.util.Arrays;

/**
 * The group's random rotation (protocol/secagg/rotation.py, FORMAT.md 12.2): pad d to a multiple
 * of 32, flip signs, permute, and multiply each block by H_L / sqrt(L), the blocks being 4096s and
 * then the binary digits of the rest, largest first. The same float operations in the same order
 * as numpy, so the rotated values match bit for bit.
 */
public final class Rotation {
  private static final int MIN_BLOCK = 32;
  private static final int MAX_BLOCK = 4096;
  private final int dim;
  private final int[] blocks;
  private final double[] signs;
  private final int[] order;

  public Rotation(byte[] graphSeed, byte[] group, int dim) {
    this.dim = dim;
    this.blocks = blocks(dim);
    int size = rotatedDim(dim);
    long[] bits = SecAggCrypto.mask(SecAggCrypto.hkdf(graphSeed, "rotation signs", group), size, 64);
    signs = new double[size];
    for (int i = 0; i < size; i++) {
      signs[i] = 1.0 - 2.0 * (bits[i] & 1L);
    }
    long[] words = SecAggCrypto.mask(SecAggCrypto.hkdf(graphSeed, "rotation order", group), size, 64);
    Integer[] sorted = new Integer[size];
    Arrays.setAll(sorted, i -> i);
    Arrays.sort(sorted, (a, b) -> {
      int c = Long.compareUnsigned(words[a], words[b]);
      return c != 0 ? c : Integer.compare(a, b);
    });
    order = new int[size];
    for (int i = 0; i < size; i++) {
      order[i] = sorted[i];
    }
  }

  /** The Hadamard blocks of {@link #rotatedDim}: 4096s, then the set bits of the rest, largest first. */
  public static int[] blocks(int dim) {
    int size = rotatedDim(dim);
    int rest = size % MAX_BLOCK;
    int[] out = new int[size / MAX_BLOCK + Integer.bitCount(rest)];
    int at = 0;
    for (int i = 0; i < size / MAX_BLOCK; i++) {
      out[at++] = MAX_BLOCK;
    }
    for (int bit = MAX_BLOCK / 2; bit >= 1; bit /= 2) {
      if ((rest & bit) != 0) {
        out[at++] = bit;
      }
    }
    return out;
  }

  /** D: d padded to a multiple of 32. */
  public static int rotatedDim(int dim) {
    return (dim + MIN_BLOCK - 1) / MIN_BLOCK * MIN_BLOCK;
  }

  public int[] blocks() {
    return blocks.clone();
  }

  public int[] order() {
    return order.clone();
  }

  public double[] signs() {
    return signs.clone();
  }

  /** R x: (d,) to (D,). */
  public double[] apply(double[] x) {
    int size = signs.length;
    double[] padded = new double[size];
    for (int i = 0; i < dim; i++) {
      padded[i] = x[i] * signs[i];
    }
    double[] y = new double[size];
    for (int k = 0; k < size; k++) {
      y[k] = padded[order[k]];
    }
    int first = 0;
    for (int block : blocks) {
      int end = first + block;
      for (int h = 1; h < block; h *= 2) {
        for (int start = first; start < end; start += 2 * h) {
          for (int j = start; j < start + h; j++) {
            double a = y[j];
            double b = y[j + h];
            y[j] = a + b;
            y[j + h] = a - b;
          }
        }
      }
      double norm = 1.0 / Math.sqrt(block);
      for (int k = first; k < end; k++) {
        y[k] *= norm;
      }
      first = end;
    }
    return y;
  }
}
