package org.fedfleet.secagg;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.TreeSet;
import org.fedfleet.wire.Json;
import org.junit.jupiter.api.Test;

/**
 * The Java secure-aggregation phone against the golden vectors of tests/golden/secagg
 * (FORMAT.md section 12.4), byte for byte: keys, pairwise keys, sealed shares, masked
 * updates and unmask shares of the Python reference (PyNaCl / libsodium, cryptography).
 */
class SecAggGoldenTest {
  private static final HexFormat HEX = HexFormat.of();

  @SuppressWarnings("unchecked")
  private static Map<String, Object> load(String name) throws Exception {
    Path dir = Path.of(System.getProperty("fedfleet.golden", "../../tests/golden"), "secagg");
    return (Map<String, Object>) Json.parse(Files.readString(dir.resolve(name + ".json"), StandardCharsets.UTF_8));
  }

  private static int num(Object o) {
    return ((Number) o).intValue();
  }

  @Test
  @SuppressWarnings("unchecked")
  void prgIsTheChaCha20Keystream() throws Exception {
    Map<String, Object> v = load("prg_chacha20");
    byte[] key = HEX.parseHex((String) v.get("key_hex"));
    long[] words = SecAggCrypto.mask(key, 4, 64);
    List<Object> expected = (List<Object>) v.get("words");
    for (int i = 0; i < 4; i++) {
      assertEquals(expected.get(i), Long.toUnsignedString(words[i]));
    }
    long[] masked = SecAggCrypto.mask(key, 4, num(v.get("mask_bits")));
    List<Object> mask = (List<Object>) v.get("mask");
    for (int i = 0; i < 4; i++) {
      assertEquals(((Number) mask.get(i)).longValue(), masked[i]);
    }
  }

  @Test
  @SuppressWarnings("unchecked")
  void neighbourGraph() throws Exception {
    Map<String, Object> v = load("graph_10_phones_degree_4");
    byte[] seed = HEX.parseHex((String) v.get("seed_hex"));
    int size = num(v.get("size"));
    List<Integer> order = ((List<Object>) v.get("ring_order")).stream().map(SecAggGoldenTest::num).toList();
    assertEquals(order, Graph.ringOrder(size, seed));
    Map<String, Object> near = (Map<String, Object>) v.get("neighbours");
    for (int i = 1; i <= size; i++) {
      List<Integer> want = ((List<Object>) near.get(String.valueOf(i))).stream().map(SecAggGoldenTest::num).toList();
      assertEquals(want, new ArrayList<>(Graph.neighboursOf(size, num(v.get("degree")), seed, i)));
    }
  }

  @Test
  @SuppressWarnings("unchecked")
  void sharedCoordinates() throws Exception {
    Map<String, Object> v = load("coords_50_keep_10");
    int[] got = Coords.shared(HEX.parseHex((String) v.get("seed_hex")),
        ((String) v.get("group")).getBytes(StandardCharsets.UTF_8), num(v.get("full_dim")), num(v.get("k")));
    List<Integer> want = ((List<Object>) v.get("coordinates")).stream().map(SecAggGoldenTest::num).toList();
    assertEquals(want, java.util.Arrays.stream(got).boxed().toList());
  }

  @Test
  @SuppressWarnings("unchecked")
  void rotation() throws Exception {
    Map<String, Object> v = load("rotation_90");
    int dim = num(v.get("dim"));
    Rotation r = new Rotation(HEX.parseHex((String) v.get("seed_hex")),
        ((String) v.get("group")).getBytes(StandardCharsets.UTF_8), dim);
    assertEquals(((List<Object>) v.get("blocks")).stream().map(SecAggGoldenTest::num).toList(),
        java.util.Arrays.stream(r.blocks()).boxed().toList());
    assertEquals(List.of(4096, 4096, 4096, 4096, 2048, 1024, 256, 128, 64),
        java.util.Arrays.stream(Rotation.blocks(19_885)).boxed().toList());
    assertEquals(19_904, Rotation.rotatedDim(19_885));
    assertEquals(num(v.get("rotated_dim")), Rotation.rotatedDim(dim));
    assertEquals(((List<Object>) v.get("order")).stream().map(SecAggGoldenTest::num).toList(),
        java.util.Arrays.stream(r.order()).boxed().toList());
    assertEquals(((List<Object>) v.get("signs")).stream().map(SecAggGoldenTest::num).toList(),
        java.util.Arrays.stream(r.signs()).mapToInt(d -> (int) d).boxed().toList());
    double[] x = ((List<Object>) v.get("x")).stream().mapToDouble(o -> ((Number) o).doubleValue()).toArray();
    double[] want = ((List<Object>) v.get("y")).stream().mapToDouble(o -> ((Number) o).doubleValue()).toArray();
    assertArrayEquals(want, r.apply(x), 0.0);  // the same operations in the same order: bit for bit
  }

  @Test
  @SuppressWarnings("unchecked")
  void packing() throws Exception {
    Map<String, Object> v = load("packing_5_bits");
    long[] values = ((List<Object>) v.get("values")).stream().mapToLong(o -> ((Number) o).longValue()).toArray();
    assertEquals(v.get("packed_hex"), HEX.formatHex(IntegerCodec.pack(values, num(v.get("bits")))));
  }

  @Test
  @SuppressWarnings("unchecked")
  void groupOfSixStepByStep() throws Exception {
    Map<String, Object> v = load("group_6_phones");
    Map<String, Object> p = (Map<String, Object>) v.get("params");
    SecAggPhone.Params params = new SecAggPhone.Params((String) p.get("group"), num(p.get("size")),
        num(p.get("degree")), num(p.get("share_threshold")), num(p.get("min_survivors")), num(p.get("modulus_bits")),
        num(p.get("rotated_dim")), HEX.parseHex((String) p.get("graph_seed_hex")));
    Map<String, Object> spec = (Map<String, Object>) v.get("phones");
    Map<Integer, SecAggPhone> phones = new TreeMap<>();
    Map<Integer, byte[][]> roster = new TreeMap<>();
    for (int i = 1; i <= params.size(); i++) {
      Map<String, Object> ph = (Map<String, Object>) spec.get(String.valueOf(i));
      SecAggPhone phone = new SecAggPhone(params, i, HEX.parseHex((String) ph.get("entropy_hex")));
      assertEquals(ph.get("channel_public_hex"), HEX.formatHex(phone.channelPublic()));
      assertEquals(ph.get("mask_public_hex"), HEX.formatHex(phone.maskPublic()));
      byte[] entropy = HEX.parseHex((String) ph.get("entropy_hex"));
      byte[] ctx = params.context();
      assertEquals(ph.get("mask_key_seed_hex"),
          HEX.formatHex(Shamir.toBytes(SecAggPhone.secretSeed(entropy, "mask key seed", ctx))));
      assertEquals(ph.get("self_mask_seed_hex"),
          HEX.formatHex(Shamir.toBytes(SecAggPhone.secretSeed(entropy, "self mask seed", ctx))));
      phones.put(i, phone);
      roster.put(i, new byte[][] {phone.channelPublic(), phone.maskPublic()});
    }
    Map<Integer, Map<Integer, byte[]>> sealed = new TreeMap<>();
    for (Map.Entry<Integer, SecAggPhone> e : phones.entrySet()) {
      Map<Integer, byte[]> out = e.getValue().shareKeys(roster);
      Map<String, Object> want = (Map<String, Object>) ((Map<String, Object>) spec.get(e.getKey().toString()))
          .get("sealed_shares_hex");
      assertEquals(want.size(), out.size());
      assertEquals(((Map<String, Object>) spec.get(e.getKey().toString())).get("shares_body_hex"),
          HEX.formatHex(SecAggPhone.packSealed(out)));
      for (Map.Entry<Integer, byte[]> s : out.entrySet()) {
        assertEquals(want.get(s.getKey().toString()), HEX.formatHex(s.getValue()));
        assertEquals(48, s.getValue().length);  // two 16-byte shares and the Poly1305 tag
      }
      sealed.put(e.getKey(), out);
    }
    Set<Integer> survivors = new TreeSet<>();
    ((List<Object>) v.get("survivors")).forEach(o -> survivors.add(num(o)));
    Set<Integer> dropped = new TreeSet<>();
    ((List<Object>) v.get("dropped")).forEach(o -> dropped.add(num(o)));
    Map<String, Object> maskedHex = (Map<String, Object>) v.get("masked_hex");
    for (int i : survivors) {
      Map<Integer, byte[]> incoming = new TreeMap<>();
      for (Map.Entry<Integer, Map<Integer, byte[]>> e : sealed.entrySet()) {
        if (e.getValue().containsKey(i)) {
          incoming.put(e.getKey(), e.getValue().get(i));
        }
      }
      List<Object> values = (List<Object>) ((Map<String, Object>) spec.get(String.valueOf(i))).get("values");
      long[] x = values.stream().mapToLong(o -> ((Number) o).longValue()).toArray();
      byte[] wire = IntegerCodec.pack(phones.get(i).maskedUpload(incoming, x), params.modulusBits());
      assertArrayEquals(HEX.parseHex((String) maskedHex.get(String.valueOf(i))), wire);
    }
    Map<String, Object> responses = (Map<String, Object>) v.get("responses");
    for (Map.Entry<String, Object> r : responses.entrySet()) {
      SecAggPhone.UnmaskShares got = phones.get(Integer.parseInt(r.getKey())).unmask(survivors, dropped);
      Map<String, Object> want = (Map<String, Object>) r.getValue();
      assertEquals(hexes((Map<String, Object>) want.get("seeds_hex")), got.seeds());
      assertEquals(hexes((Map<String, Object>) want.get("keys_hex")), got.keys());
      assertEquals(want.get("body_hex"), HEX.formatHex(SecAggPhone.packUnmask(got)));
    }
    Set<Integer> both = new TreeSet<>(survivors);
    both.add(dropped.iterator().next());
    assertThrows(SecurityException.class, () -> phones.get(1).unmask(both, dropped));
  }

  @Test
  void sharesAreSixteenByteFieldElements() {
    BigInteger y = Shamir.PRIME.subtract(BigInteger.ONE);
    assertEquals(y, Shamir.fromBytes(Shamir.toBytes(y)));
    assertThrows(IllegalArgumentException.class, () -> Shamir.fromBytes(Shamir.toBytes(Shamir.PRIME)));
    assertThrows(IllegalArgumentException.class, () -> Shamir.fromBytes(new byte[66]));
    assertThrows(IllegalArgumentException.class, () -> Shamir.split(Shamir.PRIME, List.of(1, 2), List.of()));
  }

  private static Map<Integer, BigInteger> hexes(Map<String, Object> m) {
    Map<Integer, BigInteger> out = new TreeMap<>();
    m.forEach((k, h) -> out.put(Integer.parseInt(k), new BigInteger((String) h, 16)));
    return out;
  }
}
