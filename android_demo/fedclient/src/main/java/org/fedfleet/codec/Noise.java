package org.fedfleet.codec;

import java.util.Map;
import java.util.Random;

/**
 * Step 2: local differential privacy noise, added in binary64 to the clipped update, one draw
 * per element, tensors in message order, elements in C order.
 *
 * <p>Gaussian with sigma = z * C on an update of L2 norm <= C (DP-FedAvg, McMahan et al., 2018;
 * Abadi et al., 2016), or Laplace with scale b = z * C on an update of L1 norm <= C (Dwork et
 * al., 2006). Everything after this step is post-processing and costs no privacy. Like numpy,
 * this samples floating-point noise; a phone that must resist the attacks on textbook
 * floating-point samplers (Mironov, 2012) needs a discrete sampler instead.
 */
final class Noise implements DenseStep {
  private final boolean gaussian;
  private final double scale; // sigma (Gaussian) or b (Laplace), both = z * C

  private Noise(boolean gaussian, double scale) {
    this.gaussian = gaussian;
    this.scale = scale;
  }

  static Noise gaussian(double std) {
    return new Noise(true, std);
  }

  static Noise laplace(double scale) {
    return new Noise(false, scale);
  }

  @Override
  public void apply(Map<String, double[]> update, Random rng) {
    for (double[] a : update.values()) {
      for (int i = 0; i < a.length; i++) {
        a[i] += gaussian ? scale * rng.nextGaussian() : laplace(rng);
      }
    }
  }

  /** Inverse CDF: u uniform in [-1/2, 1/2), x = -b sign(u) ln(1 - 2|u|); u = -1/2 is redrawn. */
  private double laplace(Random rng) {
    while (true) {
      double u = rng.nextDouble() - 0.5;
      double tail = 1.0 - 2.0 * Math.abs(u);
      if (tail > 0) {
        return -scale * Math.signum(u) * Math.log(tail);
      }
    }
  }
}
