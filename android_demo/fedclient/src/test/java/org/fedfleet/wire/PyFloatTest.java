package org.fedfleet.wire;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.Random;
import org.junit.jupiter.api.Test;

/** The shortest round-trip formatter against Python's own repr (tools/make_resources.py wrote the oracle). */
class PyFloatTest {
  @Test
  void matchesPythonReprOnStoredCases() throws Exception {
    int n = 0;
    try (BufferedReader r = new BufferedReader(new InputStreamReader(
        PyFloatTest.class.getResourceAsStream("float_repr.txt"), StandardCharsets.US_ASCII))) {
      for (String line; (line = r.readLine()) != null; ) {
        if (line.startsWith("#")) {
          continue;
        }
        String[] parts = line.split(" ");
        double v = Double.longBitsToDouble(Long.parseUnsignedLong(parts[0], 16));
        assertEquals(parts[1], PyFloat.repr(v), "bits " + parts[0]);
        n++;
      }
    }
    assertTrue(n > 1500, "only " + n + " cases");
  }

  @Test
  void formatsTheSpecExamples() {
    assertEquals("0.0001", PyFloat.repr(0.0001));
    assertEquals("1e-05", PyFloat.repr(1e-5));
    assertEquals("100.0", PyFloat.repr(100.0));
    assertEquals("1000000000000000.0", PyFloat.repr(1e15));
    assertEquals("1e+16", PyFloat.repr(1e16));
    assertEquals("-0.0", PyFloat.repr(-0.0));
    assertEquals("5e-324", PyFloat.repr(Double.MIN_VALUE));
    assertEquals("1.7976931348623157e+308", PyFloat.repr(Double.MAX_VALUE));
    assertEquals("2.5e-07", PyFloat.repr(2.5e-7));
    assertEquals("1e+23", PyFloat.repr(1e23)); // Double.toString gives 1.0E23, but 1e23's neighbours need care
    assertEquals("9007199254740992.0", PyFloat.repr(9007199254740993.0));
    assertThrows(IllegalArgumentException.class, () -> PyFloat.repr(Double.NaN));
    assertThrows(IllegalArgumentException.class, () -> PyFloat.repr(Double.NEGATIVE_INFINITY));
  }

  @Test
  void randomDoublesReadBackAndAreNeverLongerThanJavasDigits() {
    Random rng = new Random(42);
    for (int i = 0; i < 3000; i++) {
      double v = Double.longBitsToDouble(rng.nextLong());
      if (!Double.isFinite(v)) {
        continue;
      }
      String s = PyFloat.repr(v);
      assertEquals(v, Double.parseDouble(s), s);
      assertTrue(digits(s) <= digits(Double.toString(v)), s + " vs " + Double.toString(v));
    }
  }

  private static int digits(String s) {
    String mantissa = s.split("[eE]")[0].replace("-", "").replace(".", "").replaceAll("^0+", "");
    return mantissa.replaceAll("0+$", "").length();
  }
}
