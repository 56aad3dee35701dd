package org.fedfleet.secagg;

import java.util.Arrays;

/** Shared random-k (protocol/secagg/coords.py): the k coordinates every phone of a group sends. */
public final class Coords {
  private Coords() {}

  /** Indices 0..D-1 sorted by (PRG word, index), the first k kept, in increasing order. */
  public static int[] shared(byte[] graphSeed, byte[] group, int fullDim, int k) {
    if (k >= fullDim) {
      int[] all = new int[fullDim];
      Arrays.setAll(all, i -> i);
      return all;
    }
    long[] words = SecAggCrypto.mask(SecAggCrypto.hkdf(graphSeed, "coordinates", group), fullDim, 64);
    Integer[] order = new Integer[fullDim];
    Arrays.setAll(order, i -> i);
    Arrays.sort(order, (a, b) -> {
      int c = Long.compareUnsigned(words[a], words[b]);
      return c != 0 ? c : Integer.compare(a, b);
    });
    int[] out = new int[k];
    for (int i = 0; i < k; i++) {
      out[i] = order[i];
    }
    Arrays.sort(out);
    return out;
  }
}
