package org.fedfleet.wire;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.stream.Stream;
import org.fedfleet.codec.EncoderConfig;
import org.fedfleet.codec.UpdateEncoder;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/**
 * The Java encoder and decoder against every vector in tests/golden (FORMAT.md section 10):
 * byte for byte where the Python reference is deterministic, decode-only where its bytes came
 * from numpy's RNG or zlib, and the named error for every invalid message.
 */
class GoldenVectorsTest {
  static Path dir() {
    String path = System.getProperty("fedfleet.golden", "../../tests/golden");
    return Path.of(path);
  }

  static List<Path> files() throws IOException {
    try (Stream<Path> s = Files.list(dir())) {
      return s.filter(p -> p.toString().endsWith(".json")).sorted().toList();
    }
  }

  @Test
  void everyTypeIsPresent() throws Exception {
    List<String> types = new ArrayList<>();
    for (Path p : files()) {
      types.add((String) load(p).get("type"));
    }
    assertTrue(types.size() >= 40, "found only " + types.size() + " vectors in " + dir());
    for (String t : List.of("encode", "decode", "encode_message", "invalid")) {
      assertTrue(types.contains(t), "no vector of type " + t);
    }
  }

  @TestFactory
  Stream<DynamicTest> goldenVectors() throws IOException {
    return files().stream().map(p -> DynamicTest.dynamicTest(p.getFileName().toString(), () -> check(load(p))));
  }

  @SuppressWarnings("unchecked")
  static Map<String, Object> load(Path p) throws Exception {
    return (Map<String, Object>) Json.parse(Files.readString(p, StandardCharsets.UTF_8));
  }

  @SuppressWarnings("unchecked")
  private static void check(Map<String, Object> v) throws Exception {
    switch ((String) v.get("type")) {
      case "encode" -> {
        UpdateEncoder enc = new UpdateEncoder(EncoderConfig.fromMap((Map<String, Object>) v.get("config")), new Random(0));
        for (Object s : (List<Object>) v.get("steps")) {
          Map<String, Object> step = (Map<String, Object>) s;
          Map<String, Tensor> state = step.containsKey("state") ? tensors(step.get("state")) : Map.of();
          byte[] body = enc.encode(tensors(step.get("inputs")), state, (Map<String, Object>) step.get("meta"),
              ((Long) step.get("staleness")).intValue());
          assertEquals(step.get("message_hex"), HexFormat.of().formatHex(body));
          assertDecodes(body, step.get("decoded"));
        }
      }
      case "decode" -> {
        for (Object s : (List<Object>) v.get("steps")) {
          Map<String, Object> step = (Map<String, Object>) s;
          assertDecodes(hex(step.get("message_hex")), step.get("decoded"));
        }
      }
      case "encode_message" -> {
        Map<String, Tensor> inputs = tensors(v.get("inputs"));
        byte[] body = WireFormat.encodeDense((String) v.get("kind"), (Map<String, Object>) v.get("meta"), inputs.values());
        assertEquals(v.get("message_hex"), HexFormat.of().formatHex(body));
        assertDecodes(body, v.get("inputs"));
        assertEquals(v.get("meta"), WireFormat.decode(body, null, 0).meta());
      }
      case "invalid" -> {
        WireException e = assertThrows(WireException.class, () -> WireFormat.decode(hex(v.get("message_hex")), null, 0));
        assertEquals(v.get("error"), e.reason(), e.getMessage());
      }
      default -> throw new AssertionError("unknown vector type " + v.get("type"));
    }
  }

  /** Decoding gives exactly the expected values: same bits (so -0.0 is not 0.0), shapes, dtypes. */
  @SuppressWarnings("unchecked")
  private static void assertDecodes(byte[] body, Object expected) throws WireException {
    Message m = WireFormat.decode(body, null, 0);
    Map<String, Tensor> want = tensors(expected);
    assertEquals(new ArrayList<>(want.keySet()), new ArrayList<>(m.tensors().keySet()));
    for (Tensor w : want.values()) {
      Tensor got = m.tensors().get(w.name());
      assertEquals(w.dtype(), got.dtype());
      assertArrayEquals(w.shape(), got.shape());
      assertArrayEquals(w.bytes(), got.bytes(), "values of " + w.name());
    }
  }

  @SuppressWarnings("unchecked")
  static Map<String, Tensor> tensors(Object list) throws WireException {
    Map<String, Tensor> out = new LinkedHashMap<>();
    for (Object o : (List<Object>) list) {
      Map<String, Object> t = (Map<String, Object>) o;
      String name = (String) t.get("name");
      List<Object> shapeList = (List<Object>) t.get("shape");
      int[] shape = shapeList.stream().mapToInt(x -> ((Long) x).intValue()).toArray();
      List<Object> values = (List<Object>) t.get("values");
      DType dtype = DType.fromWire(t.get("dtype"));
      if (dtype.isFloat) {
        double[] d = values.stream().mapToDouble(x -> ((Number) x).doubleValue()).toArray();
        out.put(name, Tensor.ofDoubles(name, dtype, shape, d));
      } else {
        long[] l = values.stream().mapToLong(x -> (Long) x).toArray();
        out.put(name, Tensor.ofLongs(name, dtype, shape, l));
      }
    }
    return out;
  }

  static byte[] hex(Object s) {
    return HexFormat.of().parseHex((String) s);
  }
}
