package org.fedfleet.codec;

import java.util.Map;
import java.util.Set;
import org.fedfleet.wire.Sets;

/**
 * The update encoder's settings: the Java twin of {@code protocol/codec/config.py}, with the
 * same keys (the server sends them as {@code train.codec}), defaults and checks. Each group
 * switches one step on; leaving it at its default leaves the step out.
 */
public final class EncoderConfig {
  // 1. clipping: scale the update so its norm is <= clip (the DP sensitivity C); null = none
  public final Double clip;
  public final boolean perLayerClip; // each of L tensors to clip/sqrt(L) (L1: clip/L)
  public final int clipOrd; // 2: L2 norm (Gaussian); 1: L1 norm, which Laplace needs
  // 2. local DP noise: "gaussian" | "laplace" | null; std or scale = noiseMultiplier * clip
  public final String noise;
  public final Double noiseMultiplier;
  public final Double epsilon; // ...or calibrate noiseMultiplier to (epsilon, delta) per release
  public final Double delta;
  // 3. sparsification per tensor: "topk" | "randk" | null, keeping density * n or k entries
  public final String sparsify;
  public final Double density;
  public final Integer k;
  public final boolean randkRescale; // multiply rand-k values by n/k (unbiased)
  public final boolean errorFeedback; // keep what was not sent, add it to the next update
  public final double efDecay; // residual *= efDecay^staleness before it is added
  // 4. quantization of the values sent: 32 = float32, else 8/4/2/1 bits per value
  public final int quantBits;
  public final boolean stochasticRounding; // false: round half up (reproducible)
  public final int chunk; // values per quantization scale
  // 5. container
  public final boolean compress; // zlib over the payload

  public static final EncoderConfig DENSE = fromMap(java.util.Collections.emptyMap());

  private static final Set<String> KEYS = Sets.of("clip", "per_layer_clip", "clip_ord", "noise",
      "noise_multiplier", "epsilon", "delta", "sparsify", "density", "k", "randk_rescale", "error_feedback",
      "ef_decay", "quant_bits", "stochastic_rounding", "chunk", "compress");

  private EncoderConfig(Fields f) {
    clip = f.number("clip");
    perLayerClip = f.bool("per_layer_clip", false);
    clipOrd = f.integer("clip_ord", 2);
    noise = f.string("noise");
    noiseMultiplier = f.number("noise_multiplier");
    epsilon = f.number("epsilon");
    delta = f.number("delta");
    sparsify = f.string("sparsify");
    density = f.number("density");
    k = f.has("k") ? f.integer("k", 0) : null;
    randkRescale = f.bool("randk_rescale", true);
    errorFeedback = f.bool("error_feedback", false);
    Double decay = f.number("ef_decay");
    efDecay = decay == null ? 1.0 : decay;
    quantBits = f.integer("quant_bits", 32);
    stochasticRounding = f.bool("stochastic_rounding", true);
    chunk = f.integer("chunk", 256);
    compress = f.bool("compress", false);
    ConfigChecks.check(this);
  }

  /**
   * Builds from a map of JSON values (the task's {@code train.codec}); unknown keys and
   * ill-typed values are an {@link IllegalArgumentException}, as in Python.
   */
  public static EncoderConfig fromMap(Map<String, ?> values) {
    for (String key : values.keySet()) {
      if (!KEYS.contains(key)) {
        throw new IllegalArgumentException("unknown encoder config key '" + key + "'; known: " + KEYS);
      }
    }
    return new EncoderConfig(new Fields(values));
  }

  /** JSON values by key, typed as Python's checks type them (bool is not a number). */
  private record Fields(Map<String, ?> values) {
    boolean has(String key) {
      return values.get(key) != null;
    }

    Double number(String key) {
      Object v = values.get(key);
      if (v == null) {
        return null;
      }
      if (v instanceof Integer || v instanceof Long || v instanceof Double || v instanceof Float) {
        return ((Number) v).doubleValue();
      }
      throw new IllegalArgumentException(key + " must be a number, got " + v);
    }

    int integer(String key, int fallback) {
      Object v = values.get(key);
      if (v == null) {
        return fallback;
      }
      if ((v instanceof Integer || v instanceof Long) && ((Number) v).longValue() == ((Number) v).intValue()) {
        return ((Number) v).intValue();
      }
      throw new IllegalArgumentException(key + " must be an int, got " + v);
    }

    boolean bool(String key, boolean fallback) {
      Object v = values.get(key);
      if (v == null) {
        return fallback;
      }
      if (v instanceof Boolean b) {
        return b;
      }
      throw new IllegalArgumentException(key + " must be a bool, got " + v);
    }

    String string(String key) {
      Object v = values.get(key);
      if (v == null || v instanceof String) {
        return (String) v;
      }
      throw new IllegalArgumentException(key + " must be a string, got " + v);
    }
  }
}
