package org.fedfleet.codec;

import java.util.Arrays;
import java.util.Random;

/**
 * Step 4: keep k of a tensor's n entries and send them with their indices.
 *
 * <ul>
 *   <li>top-k keeps the k largest |x| (Aji &amp; Heafield, 2017; Stich et al., 2018, "Sparsified
 *       SGD with Memory"); biased, which error feedback repairs. Ties go to the lower index, so
 *       the choice is the same in every language.
 *   <li>rand-k keeps k uniformly random entries; scaled by n/k, the send is unbiased (Konecny et
 *       al., 2016).
 * </ul>
 */
final class Sparsifier {
  /** What a sparsifier keeps of one tensor: sorted indices (null: all) and the values at them. */
  record Pick(int[] indices, double[] values) {}

  private final boolean topk;
  private final Double density;
  private final Integer k;
  private final boolean rescale;

  Sparsifier(boolean topk, Double density, Integer k, boolean rescale) {
    this.topk = topk;
    this.density = density;
    this.k = k;
    this.rescale = rescale;
  }

  Pick pick(double[] flat, Random rng) {
    int n = flat.length;
    int keep = keepCount(n, density, k);
    int[] idx = topk ? topK(flat, keep) : randomK(n, keep, rng);
    double factor = !topk && rescale && keep > 0 ? (double) n / keep : 1.0;
    double[] values = new double[idx.length];
    for (int i = 0; i < idx.length; i++) {
      values[i] = factor == 1.0 ? flat[idx[i]] : flat[idx[i]] * factor;
    }
    return new Pick(idx, values);
  }

  /** k = min(k, n), or min(n, max(1, floor(density * n + 1/2))); 0 when n = 0. */
  static int keepCount(int n, Double density, Integer k) {
    if (n == 0) {
      return 0;
    }
    if (k != null) {
      return Math.min(k, n);
    }
    return (int) Math.min(n, Math.max(1, (long) Math.floor(density * n + 0.5)));
  }

  /** Sorted indices of the k largest |x|; among equal magnitudes the lower index first. */
  static int[] topK(double[] x, int k) {
    int n = x.length;
    if (k >= n) {
      int[] all = new int[n];
      Arrays.setAll(all, i -> i);
      return all;
    }
    if (k == 0) {
      return new int[0];
    }
    double[] mag = new double[n];
    for (int i = 0; i < n; i++) {
      mag[i] = Math.abs(x[i]);
    }
    double[] sorted = mag.clone();
    Arrays.sort(sorted);
    double threshold = sorted[n - k]; // the k-th largest magnitude
    int above = 0;
    for (double m : mag) {
      if (m > threshold) {
        above++;
      }
    }
    int ties = k - above;
    int[] out = new int[k];
    int j = 0;
    for (int i = 0; i < n; i++) { // one pass in index order keeps the result sorted
      if (mag[i] > threshold || (mag[i] == threshold && ties-- > 0)) {
        out[j++] = i;
      }
    }
    return out;
  }

  /** k distinct indices, uniformly at random (partial Fisher-Yates), sorted. */
  static int[] randomK(int n, int k, Random rng) {
    int[] perm = new int[n];
    Arrays.setAll(perm, i -> i);
    for (int i = 0; i < k; i++) {
      int j = i + rng.nextInt(n - i);
      int t = perm[i];
      perm[i] = perm[j];
      perm[j] = t;
    }
    int[] out = Arrays.copyOf(perm, k);
    Arrays.sort(out);
    return out;
  }
}
