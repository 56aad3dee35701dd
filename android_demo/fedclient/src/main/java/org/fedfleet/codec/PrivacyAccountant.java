package org.fedfleet.codec;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * This phone's own count of local-DP releases and the epsilon they add up to, by Renyi DP
 * (Mironov, 2017): the same orders, per-order RDP and RDP-to-(epsilon, delta) conversion as
 * dp_accounting's {@code RdpAccountant}, which the server's ledger uses, so the phone's status
 * screen shows the server's number. Gaussian: RDP(a) = a / (2 z^2). Laplace with b = z:
 * Mironov's Proposition 6. Conversion: Balle et al. 2020 (Proposition 12 of arXiv:2004.00010).
 */
public final class PrivacyAccountant {
  /** One noised update: mechanism ("gaussian" | "laplace") and noise multiplier z. */
  public record Release(String mechanism, double noiseMultiplier) {}

  static final double[] ORDERS = orders();
  private final Map<Release, Integer> counts = new LinkedHashMap<>();

  public synchronized void charge(Release release) {
    charge(release, 1);
  }

  /** {@code count} releases at once (restoring a saved history). */
  public synchronized void charge(Release release, int count) {
    if (count < 1) {
      throw new IllegalArgumentException("count must be >= 1, got " + count);
    }
    counts.merge(release, count, Integer::sum);
  }

  /** Releases so far, by mechanism and z: what an app saves. */
  public synchronized Map<Release, Integer> counts() {
    return new LinkedHashMap<>(counts);
  }

  public synchronized int releases() {
    return counts.values().stream().mapToInt(Integer::intValue).sum();
  }

  /** Epsilon spent at {@code delta} (0 before any release). */
  public synchronized double epsilon(double delta) {
    if (counts.isEmpty()) {
      return 0.0;
    }
    double[] rdp = new double[ORDERS.length];
    counts.forEach((r, n) -> {
      for (int i = 0; i < ORDERS.length; i++) {
        rdp[i] += n * rdp(r, ORDERS[i]);
      }
    });
    return epsilon(rdp, delta);
  }

  /**
   * Smallest z (to about 1e-7 relative) with which one release is (epsilon, delta)-DP: bisection
   * on a monotone epsilon(z), as dp_accounting's calibrate_dp_mechanism does.
   */
  public static double calibrate(String mechanism, double epsilon, double delta) {
    double lo = 1e-3 / epsilon;
    double hi = 2 * lo;
    while (single(mechanism, hi, delta) > epsilon) {
      lo = hi;
      hi *= 2;
    }
    while (hi - lo > 1e-7 * hi) {
      double mid = 0.5 * (lo + hi);
      if (single(mechanism, mid, delta) > epsilon) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    return hi;
  }

  private static double single(String mechanism, double z, double delta) {
    PrivacyAccountant a = new PrivacyAccountant();
    a.charge(new Release(mechanism, z));
    return a.epsilon(delta);
  }

  static double rdp(Release r, double a) {
    double z = r.noiseMultiplier();
    if (r.mechanism().equals("gaussian")) {
      return a / (2 * z * z);
    }
    double eps = 1 / z; // Laplace: the pure-DP epsilon of scale b = z * C at sensitivity C
    if (a < 1.1) { // Taylor series of log1p for 1 < a < 1.1, where the closed form is unstable
      double c = Math.expm1(eps * (1 - 2 * a)) / (2 * a - 1);
      double v = -c * (a - 1);
      double sum = 0;
      for (int k = 99; k >= 1; k--) {
        sum += Math.pow(v, k - 1) / k;
      }
      return eps + c * sum;
    }
    return eps + Math.log1p((a - 1) * Math.expm1(eps * (1 - 2 * a)) / (2 * a - 1)) / (a - 1);
  }

  static double epsilon(double[] rdp, double delta) {
    double best = Double.POSITIVE_INFINITY;
    for (int i = 0; i < ORDERS.length; i++) {
      double a = ORDERS[i];
      double r = rdp[i];
      double eps;
      if (r < 0 || delta * delta + Math.expm1(-r) > 0) {
        eps = 0;
      } else if (a > 1.01) {
        eps = r + Math.log1p(-1 / a) - Math.log(delta * a) / (a - 1);
      } else {
        eps = Double.POSITIVE_INFINITY;
      }
      best = Math.min(best, eps);
    }
    return Math.max(0, best);
  }

  /** dp_accounting's DEFAULT_RDP_ORDERS: 1.1..10.9 by 0.1, 11..63, 128, 256, 512, 1024. */
  private static double[] orders() {
    double[] out = new double[99 + 53 + 4];
    int i = 0;
    for (int x = 1; x < 100; x++) {
      out[i++] = 1 + x / 10.0;
    }
    for (int x = 11; x < 64; x++) {
      out[i++] = x;
    }
    for (int x : new int[] {128, 256, 512, 1024}) {
      out[i++] = x;
    }
    return out;
  }
}
