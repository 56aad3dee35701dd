package org.fedfleet.codec;

/** The consistency rules of {@code EncoderConfig.__post_init__}, one group per step. */
final class ConfigChecks {
  private ConfigChecks() {}

  static void check(EncoderConfig c) {
    clip(c);
    noise(c);
    sparsify(c);
    quant(c);
  }

  private static void clip(EncoderConfig c) {
    if (c.clip != null && !positive(c.clip)) {
      throw bad("clip must be a positive finite number or None, got " + c.clip);
    }
    if (c.perLayerClip && c.clip == null) {
      throw bad("per_layer_clip needs clip (the total bound to split over layers)");
    }
    if (c.clipOrd != 1 && c.clipOrd != 2) {
      throw bad("clip_ord must be 1 or 2, got " + c.clipOrd);
    }
  }

  private static void noise(EncoderConfig c) {
    if (c.noise == null) {
      if (c.noiseMultiplier != null || c.epsilon != null || c.delta != null) {
        throw bad("noise_multiplier/epsilon/delta are set but noise is None");
      }
      return;
    }
    if (!c.noise.equals("gaussian") && !c.noise.equals("laplace")) {
      throw bad("noise must be 'gaussian', 'laplace' or None, got " + c.noise);
    }
    if (c.clip == null) {
      throw bad("noise needs clip: without a norm bound the noise protects nothing");
    }
    if (c.noise.equals("laplace") && c.clipOrd != 1) {
      throw bad("laplace noise is calibrated to L1 sensitivity: set clip_ord=1");
    }
    boolean byTarget = c.epsilon != null || c.delta != null;
    if ((c.noiseMultiplier == null) == !byTarget) {
      throw bad("give either noise_multiplier or a target (epsilon, delta), not both or neither");
    }
    if (c.noiseMultiplier != null && !positive(c.noiseMultiplier)) {
      throw bad("noise_multiplier must be a positive finite number, got " + c.noiseMultiplier);
    }
    if (byTarget) {
      if (c.epsilon == null || !positive(c.epsilon)) {
        throw bad("epsilon must be a positive finite number, got " + c.epsilon);
      }
      if (c.delta == null || !(c.delta > 0 && c.delta < 1)) {
        throw bad("delta must be in (0, 1), got " + c.delta);
      }
    }
  }

  private static void sparsify(EncoderConfig c) {
    if (c.sparsify == null) {
      if (c.density != null || c.k != null) {
        throw bad("density/k are set but sparsify is None");
      }
    } else {
      if (!c.sparsify.equals("topk") && !c.sparsify.equals("randk")) {
        throw bad("sparsify must be 'topk', 'randk' or None, got " + c.sparsify);
      }
      if ((c.density == null) == (c.k == null)) {
        throw bad("sparsify needs exactly one of density (fraction) or k (count)");
      }
      if (c.density != null && !(c.density > 0 && c.density <= 1)) {
        throw bad("density must be in (0, 1], got " + c.density);
      }
      if (c.k != null && c.k < 1) {
        throw bad("k must be an int >= 1, got " + c.k);
      }
    }
    if (c.errorFeedback && c.sparsify == null && c.quantBits == 32) {
      throw bad("error_feedback needs a lossy step (sparsify or quant_bits < 32)");
    }
    if (c.errorFeedback && "randk".equals(c.sparsify) && c.randkRescale) {
      // the residual would carry -(n/k - 1) x on every sent entry and grow without bound
      throw bad("error_feedback with rand-k needs randk_rescale=False");
    }
    if (!(c.efDecay >= 0 && c.efDecay <= 1)) {
      throw bad("ef_decay must be in [0, 1], got " + c.efDecay);
    }
  }

  private static void quant(EncoderConfig c) {
    if (c.quantBits != 32 && c.quantBits != 8 && c.quantBits != 4 && c.quantBits != 2 && c.quantBits != 1) {
      throw bad("quant_bits must be one of (32, 8, 4, 2, 1), got " + c.quantBits);
    }
    if (c.chunk < 1 || c.chunk > org.fedfleet.wire.Quant.MAX_CHUNK) {
      throw bad("chunk must be an int in [1, " + org.fedfleet.wire.Quant.MAX_CHUNK + "], got " + c.chunk);
    }
  }

  private static boolean positive(double x) {
    return Double.isFinite(x) && x > 0;
  }

  private static IllegalArgumentException bad(String message) {
    return new IllegalArgumentException(message);
  }
}
