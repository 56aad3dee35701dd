package org.fedfleet.wire;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Strict header parsing and the canonical writer's rules (FORMAT.md section 2). */
class JsonTest {
  @Test
  void parsesTypesAsPythonDoes() throws Exception {
    Object v = Json.parse(" {\"a\": [1, -2.5e3, true, null, \"x\\u00e9\\n\"], \"b\": {}} ");
    Map<String, Object> want = new LinkedHashMap<>();
    want.put("a", java.util.Arrays.asList(1L, -2500.0, true, null, "x\u00e9\n"));
    want.put("b", Map.of());
    assertEquals(want, v);
    assertEquals(new BigInteger("123456789012345678901234567890"), Json.parse("123456789012345678901234567890"));
    assertEquals(-0.0, Json.parse("-0.0"));
  }

  @Test
  void rejectsWhatPythonRejects() {
    for (String bad : List.of("{\"a\":1,\"a\":2}", "NaN", "[Infinity]", "-Infinity", "{a:1}", "['x']", "[1,]",
        "{\"a\":1}x", "01", "1.", ".5", "\"tab\tinside\"", "\"\\x\"", "", "[1 2]", "1e400", "{\"a\" 1}",
        "[".repeat(600) + "]".repeat(600))) {
      WireException e = assertThrows(WireException.class, () -> Json.parse(bad), bad);
      assertEquals("malformed", e.reason());
    }
    byte[] invalidUtf8 = {'"', (byte) 0xc3, (byte) 0x28, '"'};
    assertThrows(WireException.class, () -> Json.parse(invalidUtf8));
    byte[] encodedSurrogate = {'"', (byte) 0xed, (byte) 0xa0, (byte) 0x80, '"'};
    assertThrows(WireException.class, () -> Json.parse(encodedSurrogate));
  }

  @Test
  void writesCanonicalForm() {
    Map<String, Object> meta = new LinkedHashMap<>();
    meta.put("z", List.of(1, 2.0, -0.0f));
    meta.put("\uD83D\uDE00", "astral"); // U+1F600 sorts after U+FFFD by code point
    meta.put("\uFFFD", "bmp");
    meta.put("a", Map.of("y", false, "b", "\"\\/\u007f\u0001"));
    String s = CanonicalJson.write(meta, true);
    assertEquals("{\"a\":{\"b\":\"\\\"\\\\/\\u007f\\u0001\",\"y\":false},\"z\":[1,2.0,-0.0],"
        + "\"\\ufffd\":\"bmp\",\"\\ud83d\\ude00\":\"astral\"}", s);
    assertEquals(s, new String(s.getBytes(StandardCharsets.US_ASCII), StandardCharsets.US_ASCII));
  }

  @Test
  void refusesWhatJsonCannotCarryExactly() {
    assertThrows(IllegalArgumentException.class, () -> CanonicalJson.write(1L << 53, true));
    assertThrows(IllegalArgumentException.class, () -> CanonicalJson.write(Double.NaN, true));
    assertThrows(IllegalArgumentException.class, () -> CanonicalJson.write(Map.of(1, 2), true));
    assertThrows(IllegalArgumentException.class, () -> CanonicalJson.write(new Object(), true));
    assertEquals("9007199254740991", CanonicalJson.write((1L << 53) - 1, true));
  }
}
