package org.fedfleet.secagg;

import java.util.Random;

/**
 * A float update to the phone's integers (protocol/secagg/integer.py): clip to L2 norm C,
 * rotate (the group's {@link Rotation}), multiply by the scale, clip each coordinate to
 * [-B, B], round stochastically (floor(v + u), redrawn while the rounded vector's L2 norm passes
 * the group's sensitivity), add discrete Gaussian noise (Canonne, Kamath and Steinke 2020,
 * Algorithm 3, with float acceptance tests) bounded by the group's tail. The draws come from the
 * phone's own generator, so they differ from numpy's: any unbiased rounding and any exact-enough
 * sampler of the same distribution will do. {@link #pack} writes the masked values b bits each.
 */
public final class IntegerCodec {
  private IntegerCodec() {}

  /** What a group's params say about the integers. */
  public record Spec(double clip, double scale, long clipBound, double sensitivity, double sigma, long tail) {}

  public static long[] toIntegers(double[] x, Spec spec, Rotation rotation, Random rng) {
    double norm = 0;
    for (double v : x) {
      norm += v * v;
    }
    norm = Math.sqrt(norm);
    double factor = norm > spec.clip() ? spec.clip() / norm : 1.0;
    double[] clipped = new double[x.length];
    for (int i = 0; i < x.length; i++) {
      clipped[i] = x[i] * factor;
    }
    double[] v = rotation.apply(clipped);
    for (int i = 0; i < v.length; i++) {
      v[i] = Math.max(-spec.clipBound(), Math.min(spec.clipBound(), v[i] * spec.scale()));
    }
    long[] out = new long[v.length];
    double bound = spec.sensitivity() * spec.sensitivity();
    while (true) {
      double sq = 0;
      for (int i = 0; i < v.length; i++) {
        out[i] = (long) Math.floor(v[i] + rng.nextDouble());
        sq += (double) out[i] * out[i];
      }
      if (sq <= bound) {
        break;
      }
    }
    if (spec.sigma() > 0) {
      for (int i = 0; i < out.length; i++) {
        out[i] += discreteGaussian(spec.sigma(), spec.tail(), rng);
      }
    }
    return out;
  }

  /** Residues mod 2^bits as a little-endian bit stream: value i is bits [i*bits, (i+1)*bits). */
  public static byte[] pack(long[] values, int bits) {
    byte[] out = new byte[(int) (((long) values.length * bits + 7) / 8)];
    long at = 0;
    for (long v : values) {
      for (int b = 0; b < bits; b++, at++) {
        if (((v >>> b) & 1L) != 0) {
          out[(int) (at >>> 3)] |= (byte) (1 << (at & 7));
        }
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
