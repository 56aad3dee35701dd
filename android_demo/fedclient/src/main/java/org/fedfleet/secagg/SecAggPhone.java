package org.fedfleet.secagg;

import java.io.ByteArrayOutputStream;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.TreeSet;

/**
 * One phone's side of SecAgg+ (FORMAT.md section 12.3), as protocol/secagg/phone.py: the keys
 * and secrets derive from 32 bytes of entropy, shares go sealed to the neighbours, the masked
 * update adds the self mask and the pairwise masks mod 2^b, and an unmask request that could
 * isolate one phone's update is refused.
 */
public final class SecAggPhone {
  private static final String MASK_KEY_SEED = "mask key seed";
  private static final String SELF_MASK_SEED = "self mask seed";
  private static final List<String> LABELS = List.of(MASK_KEY_SEED, SELF_MASK_SEED);

  /** What the group agreed on (the server's {@code params}). */
  public record Params(String group, int size, int degree, int shareThreshold, int minSurvivors, int modulusBits,
      int dim, byte[] graphSeed) {
    byte[] context() {
      return group.getBytes(StandardCharsets.UTF_8);
    }
  }

  /** The shares an unmask request gets: surviving neighbours' seeds, dropped neighbours' keys. */
  public record UnmaskShares(Map<Integer, BigInteger> seeds, Map<Integer, BigInteger> keys) {}

  private final Params params;
  private final int index;
  private final byte[] channelSecret;
  private final Map<String, BigInteger> secrets = new TreeMap<>();  // the shared 127-bit seeds
  private final byte[] maskSecret;
  private final byte[] selfMask;
  private final Map<String, List<BigInteger>> coefficients = new TreeMap<>();
  private final TreeSet<Integer> neighbours;
  private final Map<Integer, byte[][]> roster = new TreeMap<>();
  private Map<Integer, BigInteger[]> held;  // neighbour -> {key share, seed share}
  private List<Set<Integer>> answered;

  public SecAggPhone(Params params, int index, byte[] entropy) {
    if (index < 1 || index > params.size() || entropy.length != 32) {
      throw new IllegalArgumentException("index must be in [1, n] and entropy 32 bytes");
    }
    this.params = params;
    this.index = index;
    byte[] ctx = params.context();
    channelSecret = SecAggCrypto.hkdf(entropy, "channel key", ctx);
    for (String label : LABELS) {
      secrets.put(label, secretSeed(entropy, label, ctx));
      List<BigInteger> cs = new ArrayList<>();
      for (int m = 1; m < params.shareThreshold(); m++) {
        cs.add(new BigInteger(1, SecAggCrypto.hkdf(entropy, "shamir " + label + " " + m, ctx)).mod(Shamir.PRIME));
      }
      coefficients.put(label, cs);
    }
    maskSecret = maskSecretKey(secrets.get(MASK_KEY_SEED), ctx);
    selfMask = SecAggCrypto.hkdf(Shamir.toBytes(secrets.get(SELF_MASK_SEED)), "self mask", ctx);
    neighbours = Graph.neighboursOf(params.size(), params.degree(), params.graphSeed(), index);
  }

  /** HKDF(E, label, ctx, 16) as a big-endian integer mod 2^127 - 1: a shared 127-bit seed. */
  static BigInteger secretSeed(byte[] entropy, String label, byte[] ctx) {
    return new BigInteger(1, SecAggCrypto.hkdf(entropy, label, ctx, Shamir.SHARE_BYTES)).mod(Shamir.PRIME);
  }

  /** s_sk, the X25519 secret key of the pairwise masks, from its 127-bit seed. */
  static byte[] maskSecretKey(BigInteger maskSeed, byte[] ctx) {
    return SecAggCrypto.hkdf(Shamir.toBytes(maskSeed), "mask key", ctx);
  }

  /** The keys a phone with {@code entropy} advertises in the group named {@code group}. */
  public static byte[][] keysFor(byte[] entropy, String group) {
    byte[] ctx = group.getBytes(StandardCharsets.UTF_8);
    return new byte[][] {SecAggCrypto.publicKey(SecAggCrypto.hkdf(entropy, "channel key", ctx)),
        SecAggCrypto.publicKey(maskSecretKey(secretSeed(entropy, MASK_KEY_SEED, ctx), ctx))};
  }

  public byte[] channelPublic() {
    return SecAggCrypto.publicKey(channelSecret);
  }

  public byte[] maskPublic() {
    return SecAggCrypto.publicKey(maskSecret);
  }

  public Set<Integer> neighbours() {
    return neighbours;
  }

  /** roster: phone -> {channel public key, mask public key}. Returns recipient -> sealed shares. */
  public Map<Integer, byte[]> shareKeys(Map<Integer, byte[][]> advertised) {
    if (!roster.isEmpty()) {
      throw new IllegalStateException("keys already shared");
    }
    for (Map.Entry<Integer, byte[][]> e : advertised.entrySet()) {
      if (neighbours.contains(e.getKey())) {
        roster.put(e.getKey(), e.getValue());
      }
    }
    List<Integer> xs = new ArrayList<>(roster.keySet());
    List<BigInteger> keyShares = Shamir.split(secrets.get(MASK_KEY_SEED), xs, coefficients.get(MASK_KEY_SEED));
    List<BigInteger> seedShares = Shamir.split(secrets.get(SELF_MASK_SEED), xs, coefficients.get(SELF_MASK_SEED));
    Map<Integer, byte[]> out = new TreeMap<>();
    for (int i = 0; i < xs.size(); i++) {
      int j = xs.get(i);
      byte[] plain = new byte[2 * Shamir.SHARE_BYTES];
      System.arraycopy(Shamir.toBytes(keyShares.get(i)), 0, plain, 0, Shamir.SHARE_BYTES);
      System.arraycopy(Shamir.toBytes(seedShares.get(i)), 0, plain, Shamir.SHARE_BYTES, Shamir.SHARE_BYTES);
      out.put(j, SecAggCrypto.seal(channelSecret, roster.get(j)[0], params.context(), index, j, plain));
    }
    return out;
  }

  /** y = x + PRG(b) +- PRG(pairwise) mod 2^b, over the neighbours whose shares came in. */
  public long[] maskedUpload(Map<Integer, byte[]> incoming, long[] values) {
    if (held != null || roster.isEmpty()) {
      throw new IllegalStateException("masked upload out of order");
    }
    if (!roster.keySet().containsAll(incoming.keySet())) {
      throw new IllegalArgumentException("shares from phones outside this phone's neighbours");
    }
    int bits = params.modulusBits();
    long keep = bits >= 64 ? -1L : (1L << bits) - 1;
    Map<Integer, BigInteger[]> got = new TreeMap<>();
    for (Map.Entry<Integer, byte[]> e : incoming.entrySet()) {
      int j = e.getKey();
      byte[] plain = SecAggCrypto.open(channelSecret, roster.get(j)[0], params.context(), j, index, e.getValue());
      if (plain.length != 2 * Shamir.SHARE_BYTES) {
        throw new IllegalArgumentException("a share message is " + 2 * Shamir.SHARE_BYTES + " bytes");
      }
      got.put(j, new BigInteger[] {
          Shamir.fromBytes(Arrays.copyOfRange(plain, 0, Shamir.SHARE_BYTES)),
          Shamir.fromBytes(Arrays.copyOfRange(plain, Shamir.SHARE_BYTES, 2 * Shamir.SHARE_BYTES))});
    }
    long[] y = SecAggCrypto.mask(selfMask, params.dim(), bits);
    for (int i = 0; i < y.length; i++) {
      y[i] += values[i];
    }
    for (int j : got.keySet()) {
      byte[] pairwise = SecAggCrypto.hkdf(SecAggCrypto.x25519(maskSecret, roster.get(j)[1]), "pairwise mask",
          params.context());
      long[] m = SecAggCrypto.mask(pairwise, params.dim(), bits);
      for (int i = 0; i < y.length; i++) {
        y[i] = index < j ? y[i] + m[i] : y[i] - m[i];  // two's complement wraps mod 2^64
      }
    }
    for (int i = 0; i < y.length; i++) {
      y[i] &= keep;
    }
    held = got;
    return y;
  }

  /** The share-keys body (FORMAT.md 12.5): the sealed shares in increasing recipient order. */
  public static byte[] packSealed(Map<Integer, byte[]> sealed) {
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    for (byte[] s : new TreeMap<>(sealed).values()) {
      out.writeBytes(s);
    }
    return out.toByteArray();
  }

  /** The unmask body (FORMAT.md 12.5): seeds and keys together, 16 bytes each, increasing neighbour order. */
  public static byte[] packUnmask(UnmaskShares shares) {
    Map<Integer, BigInteger> merged = new TreeMap<>(shares.seeds());
    merged.putAll(shares.keys());
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    for (BigInteger y : merged.values()) {
      out.writeBytes(Shamir.toBytes(y));
    }
    return out.toByteArray();
  }

  public UnmaskShares unmask(Set<Integer> survivors, Set<Integer> dropped) {
    if (held == null) {
      throw new IllegalStateException("no masked update made");
    }
    Set<Integer> both = new TreeSet<>(survivors);
    both.retainAll(dropped);
    if (!both.isEmpty() || !survivors.contains(index)) {
      throw new SecurityException("refused: the request could isolate one phone's update");
    }
    List<Set<Integer>> request = List.of(Set.copyOf(survivors), Set.copyOf(dropped));
    if (answered != null && !answered.equals(request)) {
      throw new SecurityException("refused: shares already given for other survivors");
    }
    if (survivors.size() < params.minSurvivors()) {
      throw new IllegalStateException("below the threshold: " + survivors.size() + " survivors");
    }
    answered = request;
    Map<Integer, BigInteger> seeds = new TreeMap<>();
    Map<Integer, BigInteger> keys = new TreeMap<>();
    for (Map.Entry<Integer, BigInteger[]> e : held.entrySet()) {
      if (survivors.contains(e.getKey())) {
        seeds.put(e.getKey(), e.getValue()[1]);
      } else if (dropped.contains(e.getKey())) {
        keys.put(e.getKey(), e.getValue()[0]);
      }
    }
    return new UnmaskShares(seeds, keys);
  }
}
