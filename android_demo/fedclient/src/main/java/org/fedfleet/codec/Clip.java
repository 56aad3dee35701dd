package org.fedfleet.codec;

import java.util.Map;
import java.util.Random;

/**
 * Step 1: norm clipping, which bounds each phone's influence (the DP sensitivity C).
 *
 * <p>DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
 * Models") clips the whole update to norm C; per-layer clipping splits the bound so the whole
 * update still has norm <= C: C / sqrt(L) per tensor for L2, C / L for L1.
 */
final class Clip implements DenseStep {
  private final double bound;
  private final boolean perLayer;
  private final int ord;

  Clip(double bound, boolean perLayer, int ord) {
    this.bound = bound;
    this.perLayer = perLayer;
    this.ord = ord;
  }

  @Override
  public void apply(Map<String, double[]> update, Random rng) {
    if (!perLayer) {
      scale(update.values(), bound);
      return;
    }
    int layers = Math.max(update.size(), 1);
    double share = bound / (ord == 2 ? Math.sqrt(layers) : layers);
    for (double[] a : update.values()) {
      scale(java.util.Collections.singletonList(a), share);
    }
  }

  /** Every element times C / N when the norm N of {@code tensors} exceeds C: x * (C / N). */
  private void scale(Iterable<double[]> tensors, double limit) {
    double norm = norm(tensors, ord);
    if (norm <= limit) {
      return;
    }
    double factor = limit / norm;
    for (double[] a : tensors) {
      for (int i = 0; i < a.length; i++) {
        a[i] *= factor;
      }
    }
  }

  /** L1 (sum of |x|) or L2 (sqrt of the sum of squares) of all tensors together. */
  static double norm(Iterable<double[]> tensors, int ord) {
    double sum = 0;
    for (double[] a : tensors) {
      double part = 0;
      for (double x : a) {
        part += ord == 1 ? Math.abs(x) : x * x;
      }
      sum += part;
    }
    return ord == 1 ? sum : Math.sqrt(sum);
  }
}
