package org.fedfleet.wire;

import java.math.BigDecimal;
import java.math.MathContext;
import java.math.RoundingMode;

/**
 * Formats a double as Python's {@code repr(float)} does (FORMAT.md section 2, rule 6), so that
 * a header carrying floats is the same bytes in Java and Python.
 *
 * <p>{@code Double.toString} before JDK 19 does not always give the shortest digits (JDK-4511638),
 * so the digits are searched: for each length p = 1..17, the p-digit decimals just below and
 * just above the exact value are the only candidates (any other p-digit decimal is farther on
 * the same side); the first length with a candidate that reads back to the same double wins,
 * the nearer candidate if both do. Checking both sides matters at powers of two, where the
 * rounding interval is twice as wide above the value as below it.
 */
public final class PyFloat {
  private PyFloat() {}

  public static String repr(double v) {
    if (Double.isNaN(v) || Double.isInfinite(v)) {
      throw new IllegalArgumentException(v + " cannot be written as JSON");
    }
    boolean negative = Double.doubleToRawLongBits(v) < 0;
    if (v == 0) {
      return negative ? "-0.0" : "0.0";
    }
    BigDecimal d = shortest(Math.abs(v)).stripTrailingZeros();
    String digits = d.unscaledValue().toString();
    int exp = digits.length() - 1 - d.scale(); // v = d1.d2...dn x 10^exp
    String body = (exp >= -4 && exp < 16) ? positional(digits, exp) : scientific(digits, exp);
    return negative ? "-" + body : body;
  }

  static BigDecimal shortest(double a) {
    BigDecimal exact = new BigDecimal(a);
    for (int p = 1; p <= 17; p++) {
      BigDecimal lo = exact.round(new MathContext(p, RoundingMode.FLOOR));
      BigDecimal hi = exact.round(new MathContext(p, RoundingMode.CEILING));
      boolean loOk = readsBack(lo, a);
      boolean hiOk = readsBack(hi, a);
      if (loOk && hiOk) {
        int cmp = exact.subtract(lo).compareTo(hi.subtract(exact));
        return cmp < 0 ? lo : cmp > 0 ? hi : exact.round(new MathContext(p, RoundingMode.HALF_EVEN));
      }
      if (loOk) {
        return lo;
      }
      if (hiOk) {
        return hi;
      }
    }
    return exact.round(new MathContext(17, RoundingMode.HALF_EVEN)); // 17 digits always read back
  }

  private static boolean readsBack(BigDecimal candidate, double a) {
    return Double.parseDouble(candidate.toString()) == a; // parseDouble rounds correctly
  }

  private static String positional(String digits, int exp) {
    int n = digits.length();
    if (exp < 0) {
      return "0." + zeros(-exp - 1) + digits;
    }
    if (n <= exp + 1) {
      return digits + zeros(exp + 1 - n) + ".0";
    }
    return digits.substring(0, exp + 1) + "." + digits.substring(exp + 1);
  }

  private static String zeros(int n) {
    StringBuilder sb = new StringBuilder();
    for (int i = 0; i < n; i++) {
      sb.append('0');
    }
    return sb.toString();
  }

  private static String scientific(String digits, int exp) {
    String mantissa = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
    int abs = Math.abs(exp);
    return mantissa + "e" + (exp < 0 ? "-" : "+") + (abs < 10 ? "0" : "") + abs;
  }
}
