package org.fedfleet.wire;

/**
 * IEEE-754 binary16 conversions. Java 17 has no {@code Float.floatToFloat16} (added in 20);
 * numpy converts binary64 straight to binary16 with one rounding (to nearest, ties to even),
 * so this does too rather than going through float32, which could round twice.
 */
final class Half {
  private Half() {}

  static double toDouble(short h) {
    int bits = h & 0xffff;
    double sign = (bits & 0x8000) != 0 ? -1.0 : 1.0;
    int exp = (bits >>> 10) & 0x1f;
    int mant = bits & 0x3ff;
    if (exp == 0) {
      return sign * mant * 0x1p-24; // zero and subnormals
    }
    if (exp == 31) {
      return mant == 0 ? sign * Double.POSITIVE_INFINITY : Double.NaN;
    }
    return sign * (1024 + mant) * Math.scalb(1.0, exp - 25);
  }

  static short fromDouble(double v) {
    int sign = (Double.doubleToRawLongBits(v) < 0) ? 0x8000 : 0;
    double a = Math.abs(v);
    if (Double.isNaN(v)) {
      return (short) 0x7e00;
    }
    if (a >= 65520.0) { // 65504 is the largest half; the midpoint to 65536 rounds (to even) up
      return (short) (sign | 0x7c00);
    }
    if (a < 0x1p-14) { // subnormal: a multiple of 2^-24; rint ties to even; 1024 carries into normal
      return (short) (sign | (int) Math.rint(a * 0x1p24));
    }
    int e = Math.getExponent(a);
    long q = (long) Math.rint(Math.scalb(a, 10 - e)); // in [1024, 2048]; 2048 carries into e + 1
    return (short) (sign | (((e + 15) << 10) + (int) (q - 1024)));
  }
}
