package org.fedfleet.secagg;

import java.util.Arrays;

/**
 * The group's random rotation (protocol/secagg/rotation.py, FORMAT.md 12.2): pad d to whole
 * blocks of L (the largest power of two up to 4096 whose padding stays within d / 32), flip
 * signs, permute, and multiply each block by H_L / sqrt(L). The same float operations in the
 * same order as numpy, so the rotated values match bit for bit.
 */
public final class Rotation {
  private static final int MAX_BLOCK = 4096;
  private final int dim;
  private final int block;
  private final double[] signs;
  private final int[] order;

  public Rotation(byte[] graphSeed, byte[] group, int dim) {
    this.dim = dim;
    this.block = blockSize(dim);
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

  public static int blockSize(int dim) {
    int block = MAX_BLOCK;
    while (block > 1 && ceilDiv(dim, block) * (long) block - dim > dim / 32.0) {
      block /= 2;
    }
    return block;
  }

  public static int rotatedDim(int dim) {
    int block = blockSize(dim);
    return ceilDiv(dim, block) * block;
  }

  private static int ceilDiv(int a, int b) {
    return (a + b - 1) / b;
  }

  public int block() {
    return block;
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
    for (int h = 1; h < block; h *= 2) {
      for (int start = 0; start < size; start += 2 * h) {
        for (int j = start; j < start + h; j++) {
          double a = y[j];
          double b = y[j + h];
          y[j] = a + b;
          y[j + h] = a - b;
        }
      }
    }
    double norm = 1.0 / Math.sqrt(block);
    for (int k = 0; k < size; k++) {
      y[k] *= norm;
    }
    return y;
  }
}
