package org.fedfleet.secagg;

import java.math.BigInteger;
import java.util.ArrayList;
import java.util.List;

/**
 * Shamir sharing over GF(2^127 - 1) (FORMAT.md section 12.2): the secrets are field elements (the
 * phone's 127-bit mask-key and self-mask seeds) and every share is 16 bytes, big-endian.
 */
public final class Shamir {
  public static final BigInteger PRIME = BigInteger.ONE.shiftLeft(127).subtract(BigInteger.ONE);
  public static final int SHARE_BYTES = 16;

  private Shamir() {}

  /** f(x) for each x, f(0) = the secret (a field element), higher coefficients as given. */
  public static List<BigInteger> split(BigInteger secret, List<Integer> xs, List<BigInteger> coefficients) {
    if (secret.signum() < 0 || secret.compareTo(PRIME) >= 0) {
      throw new IllegalArgumentException("the secret must be a field element");
    }
    List<BigInteger> coeffs = new ArrayList<>();
    coeffs.add(secret);
    coeffs.addAll(coefficients);
    List<BigInteger> out = new ArrayList<>();
    for (int x : xs) {
      BigInteger y = BigInteger.ZERO;
      BigInteger bx = BigInteger.valueOf(x);
      for (int i = coeffs.size() - 1; i >= 0; i--) {
        y = y.multiply(bx).add(coeffs.get(i)).mod(PRIME);
      }
      out.add(y);
    }
    return out;
  }

  /** A field element as 16 bytes, big-endian. */
  public static byte[] toBytes(BigInteger y) {
    byte[] raw = y.toByteArray();
    byte[] out = new byte[SHARE_BYTES];
    int n = Math.min(raw.length, SHARE_BYTES);
    System.arraycopy(raw, raw.length - n, out, SHARE_BYTES - n, n);
    return out;
  }

  /** 16 big-endian bytes as a field element; anything else is refused. */
  public static BigInteger fromBytes(byte[] data) {
    if (data.length != SHARE_BYTES) {
      throw new IllegalArgumentException("a share is " + SHARE_BYTES + " bytes, got " + data.length);
    }
    BigInteger y = new BigInteger(1, data);
    if (y.compareTo(PRIME) >= 0) {
      throw new IllegalArgumentException("a share is not a field element");
    }
    return y;
  }
}
