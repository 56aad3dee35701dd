package org.fedfleet.secagg;

import java.math.BigInteger;
import java.util.ArrayList;
import java.util.List;

/** Shamir sharing of 32-byte secrets over GF(2^521 - 1) (FORMAT.md section 12.2). */
public final class Shamir {
  public static final BigInteger PRIME = BigInteger.ONE.shiftLeft(521).subtract(BigInteger.ONE);
  public static final int SHARE_BYTES = 66;

  private Shamir() {}

  /** f(x) for each x, f(0) = the secret (big-endian), higher coefficients as given. */
  public static List<BigInteger> split(byte[] secret, List<Integer> xs, List<BigInteger> coefficients) {
    List<BigInteger> coeffs = new ArrayList<>();
    coeffs.add(new BigInteger(1, secret));
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

  public static byte[] toBytes(BigInteger y) {
    byte[] raw = y.toByteArray();
    byte[] out = new byte[SHARE_BYTES];
    int n = Math.min(raw.length, SHARE_BYTES);
    System.arraycopy(raw, raw.length - n, out, SHARE_BYTES - n, n);
    return out;
  }
}
