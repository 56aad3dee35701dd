package org.fedfleet.wire;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.zip.DeflaterOutputStream;
import org.junit.jupiter.api.Test;

/** Container round trips and the limits a decoder enforces before it allocates (FORMAT.md section 7). */
class WireFormatTest {
  private static final Map<String, Object> META = Map.of("version", 3);

  @Test
  void everyDtypeRoundTripsDenseAndCompressed() throws Exception {
    List<Tensor> tensors = List.of(
        Tensor.ofDoubles("h", DType.FLOAT16, new int[] {4}, new double[] {0.5, -65504.0, 6e-8, 1.0 / 3}),
        Tensor.ofDoubles("d", DType.FLOAT64, new int[] {2, 1}, new double[] {Math.PI, -0.0}),
        Tensor.ofLongs("i", DType.INT32, new int[] {2}, new long[] {Integer.MIN_VALUE, 7}),
        Tensor.ofLongs("l", DType.INT64, new int[] {1}, new long[] {Long.MAX_VALUE}),
        Tensor.ofFloats("f", new int[] {0, 5}, new float[0]));
    for (boolean compress : new boolean[] {false, true}) {
      List<WireTensor> wire = tensors.stream().map(WireTensor::dense).toList();
      byte[] body = WireFormat.encode("model", META, wire, compress);
      Message m = WireFormat.decode(body, null, 0);
      assertEquals(Map.of("version", 3L), m.meta());
      for (Tensor t : tensors) {
        assertArrayEquals(t.bytes(), m.tensors().get(t.name()).bytes(), t.name());
      }
    }
  }

  @Test
  void halfConversionRoundsToNearestEven() {
    assertEquals(0x3c00, Half.fromDouble(1.0) & 0xffff);
    assertEquals(0x3c00, Half.fromDouble(1.0 + 0x1p-11) & 0xffff); // halfway: ties to even (down)
    assertEquals(0x3c02, Half.fromDouble(1.0 + 3 * 0x1p-11) & 0xffff); // halfway: ties to even (up)
    assertEquals(0x0001, Half.fromDouble(0x1p-24) & 0xffff); // smallest subnormal
    assertEquals(0x0000, Half.fromDouble(0x1p-25) & 0xffff); // halfway to 0: even
    assertEquals(0x0400, Half.fromDouble(0x1p-14 - 0x1p-26) & 0xffff); // rounds up into the normals
    assertEquals(0x7bff, Half.fromDouble(65519.99) & 0xffff);
    assertEquals(0x7c00, Half.fromDouble(65520.0) & 0xffff);
    assertEquals(0x8000, Half.fromDouble(-0.0) & 0xffff);
    for (int bits = 0; bits < 0x7c00; bits++) { // every finite half reads back exactly
      assertEquals(bits, Half.fromDouble(Half.toDouble((short) bits)) & 0xffff);
    }
  }

  @Test
  void expectedSpecsAreCheckedBeforeThePayload() throws Exception {
    byte[] body = WireFormat.encodeDense("update", META, List.of(Tensor.ofFloats("w", new int[] {2}, new float[2])));
    Map<String, TensorSpec> ok = Map.of("w", new TensorSpec(new int[] {2}, DType.FLOAT32));
    assertEquals(1, WireFormat.decode(body, ok, 0).tensors().size());
    for (Map<String, TensorSpec> bad : List.of(Map.of("w", new TensorSpec(new int[] {3}, DType.FLOAT32)),
        Map.of("w", new TensorSpec(new int[] {2}, DType.FLOAT64)), Map.of("v", new TensorSpec(new int[] {2}, DType.FLOAT32)))) {
      assertEquals("shape_mismatch", assertThrows(WireException.class, () -> WireFormat.decode(body, bad, 0)).reason());
    }
    assertEquals("malformed", assertThrows(WireException.class, () -> WireFormat.decode(body, ok, body.length - 1)).reason());
  }

  @Test
  void compressionBombStopsAtTheDeclaredSize() throws Exception {
    ByteArrayOutputStream z = new ByteArrayOutputStream();
    try (DeflaterOutputStream d = new DeflaterOutputStream(z)) {
      d.write(new byte[50 << 20]); // 50 MiB of zeros, ~50 KiB compressed
    }
    String header = "{\"kind\":\"model\",\"meta\":{},\"tensors\":[{\"name\":\"w\",\"dtype\":\"float32\",\"shape\":[4],"
        + "\"encoding\":\"dense\",\"nbytes\":16}]}";
    byte[] body = WireFormat.frame(header.getBytes(StandardCharsets.US_ASCII), z.toByteArray(), WireFormat.FLAG_ZLIB, 1);
    assertEquals("malformed", assertThrows(WireException.class, () -> WireFormat.decode(body, null, 0)).reason());
  }

  @Test
  void hugeDeclaredShapesAreRefusedWithoutAllocating() {
    String header = "{\"kind\":\"model\",\"meta\":{},\"tensors\":[{\"name\":\"w\",\"dtype\":\"float32\","
        + "\"shape\":[268435456,268435456,268435456,268435456,268435456,268435456,268435456,268435456],"
        + "\"encoding\":\"dense\",\"nbytes\":0}]}";
    byte[] body = WireFormat.frame(header.getBytes(StandardCharsets.US_ASCII), new byte[0], 0, 1);
    assertEquals("malformed", assertThrows(WireException.class, () -> WireFormat.decode(body, null, 0)).reason());
  }

  @Test
  void randomCorruptionIsAlwaysANamedError() {
    byte[] good = WireFormat.encodeDense("update", META, List.of(Tensor.ofFloats("w", new int[] {8}, new float[8])));
    Random rng = new Random(1);
    for (int i = 0; i < 2000; i++) {
      byte[] bad = good.clone();
      bad[rng.nextInt(bad.length)] ^= (byte) (1 + rng.nextInt(255));
      byte[] cut = java.util.Arrays.copyOf(bad, rng.nextInt(bad.length + 1));
      for (byte[] b : List.of(bad, cut)) {
        assertThrows(WireException.class, () -> WireFormat.decode(b, null, 0));
      }
    }
  }
}
