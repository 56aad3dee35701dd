package org.fedfleet.secagg;

import java.util.Random;

/**
 * A float update to the phone's integers (protocol/secagg/integer.py): clip to L2 norm C,
 * multiply by the scale, round stochastically (floor(v + u)), add discrete Gaussian noise
 * (Canonne, Kamath and Steinke 2020, Algorithm 3, with float acceptance tests) bounded by the
 * group's tail. The draws come from the phone's own generator, so they differ from numpy's:
 * any unbiased rounding and any exact-enough sampler of the same distribution will do.
 */
public final class IntegerCodec {
  private IntegerCodec() {}

  public static long[] toIntegers(double[] x, double clip, double scale, double sigma, long tail, Random rng) {
    double norm = 0;
    for (double v : x) {
      norm += v * v;
    }
    norm = Math.sqrt(norm);
    double factor = norm > clip ? clip / norm : 1.0;
    long[] out = new long[x.length];
    for (int i = 0; i < x.length; i++) {
      out[i] = (long) Math.floor(x[i] * factor * scale + rng.nextDouble());
      if (sigma > 0) {
        out[i] += discreteGaussian(sigma, tail, rng);
      }
    }
    return out;
  }

  static long discreteGaussian(double sigma, long tail, Random rng) {
    double s = Math.floor(sigma) + 1;
    double logQ = -1.0 / s;  // geometric with success probability 1 - e^(-1/s)
    while (true) {
      long y = geometric(logQ, rng) - geometric(logQ, rng);
      double d = Math.abs(y) - sigma * sigma / s;
      if (Math.abs(y) <= tail && rng.nextDouble() < Math.exp(-d * d / (2 * sigma * sigma))) {
        return y;
      }
    }
  }

  private static long geometric(double logQ, Random rng) {
    return (long) Math.floor(Math.log(1.0 - rng.nextDouble()) / logQ);
  }
}
