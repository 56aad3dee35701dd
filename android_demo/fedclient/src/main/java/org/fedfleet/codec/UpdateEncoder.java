package org.fedfleet.codec;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.fedfleet.wire.DType;
import org.fedfleet.wire.IndexCoding;
import org.fedfleet.wire.Tensor;
import org.fedfleet.wire.WireFormat;
import org.fedfleet.wire.WireTensor;

/**
 * Turns one model delta into one "update" message: clip, local DP noise, (+ residual),
 * sparsify, quantize, lay out (FORMAT.md section 6), the Java twin of {@code
 * protocol/codec/encoder.py}. The pipeline is assembled once from the config; a step it leaves
 * out is not in the list. All randomness comes from the one {@link Random} given, in step
 * order: pass a {@link java.security.SecureRandom} on a phone, a seeded Random in tests.
 */
public final class UpdateEncoder {
  /** A state entry's name on the wire: this prefix and the buffer's name (FORMAT.md section 11). */
  public static final String STATE_PREFIX = "state:";
  private final EncoderConfig config;
  private final Random rng;
  private final Double noiseMultiplier;
  private final List<DenseStep> steps = new ArrayList<>();
  private final Sparsifier sparsifier;
  private final ValueCoder values;
  private final ErrorFeedback feedback;

  public UpdateEncoder(EncoderConfig config, Random rng) {
    this.config = config;
    this.rng = rng;
    this.noiseMultiplier = resolveNoiseMultiplier(config);
    if (config.clip != null) {
      steps.add(new Clip(config.clip, config.perLayerClip, config.clipOrd));
    }
    if (noiseMultiplier != null) {
      double scale = noiseMultiplier * config.clip;
      steps.add(config.noise.equals("gaussian") ? Noise.gaussian(scale) : Noise.laplace(scale));
    }
    sparsifier = config.sparsify == null ? null
        : new Sparsifier(config.sparsify.equals("topk"), config.density, config.k, config.randkRescale);
    values = new ValueCoder(config.quantBits, config.chunk, config.stochasticRounding);
    feedback = config.errorFeedback ? new ErrorFeedback(config.efDecay) : null;
  }

  /** z as configured, or calibrated so one release is (epsilon, delta)-DP under RDP accounting. */
  static Double resolveNoiseMultiplier(EncoderConfig c) {
    if (c.noise == null) {
      return null;
    }
    if (c.noiseMultiplier != null) {
      return c.noiseMultiplier;
    }
    return PrivacyAccountant.calibrate(c.noise, c.epsilon, c.delta);
  }

  /**
   * Encodes {@code delta} (new params - downloaded params, any float or int dtype) with {@code
   * meta} in the header. {@code staleness}: model versions between the residual's base version
   * and this delta's (decays the residual). NaN or Inf in the delta is refused here, before
   * anything (residual, RNG) changes.
   */
  public byte[] encode(Map<String, Tensor> delta, Map<String, ?> meta, int staleness) {
    return encode(delta, Map.of(), meta, staleness);
  }

  /**
   * As {@link #encode(Map, Map, int)}, the model's {@code state} after training (batch norm running
   * statistics and counters, by buffer name; FORMAT.md section 11) appended as dense {@code
   * "state:<buffer>"} entries after the update's own tensors: float32 (int64 for an integer counter),
   * absolute values, never clipped, noised, error-fed, sparsified or quantized. NaN or Inf in the
   * state is refused before anything changes.
   */
  public byte[] encode(Map<String, Tensor> delta, Map<String, Tensor> state, Map<String, ?> meta, int staleness) {
    List<WireTensor> kept = stateTensors(state);
    if (staleness < 0) {
      throw new IllegalArgumentException("staleness must be an int >= 0, got " + staleness);
    }
    Map<String, double[]> update = new LinkedHashMap<>();
    Map<String, int[]> shapes = new LinkedHashMap<>();
    for (Map.Entry<String, Tensor> e : delta.entrySet()) {
      double[] a = e.getValue().doubles(); // a copy: steps never write into the caller's data
      for (double x : a) {
        if (!Double.isFinite(x)) {
          throw new NonFiniteUpdateException("delta '" + e.getKey() + "' holds NaN or Inf; refusing to send it");
        }
      }
      update.put(e.getKey(), a);
      shapes.put(e.getKey(), e.getValue().shape());
    }
    for (DenseStep step : steps) {
      step.apply(update, rng);
    }
    if (feedback != null) {
      feedback.addTo(update, staleness);
    }
    List<WireTensor> wire = new ArrayList<>();
    Map<String, int[]> indices = new LinkedHashMap<>();
    Map<String, float[]> sent = new LinkedHashMap<>();
    for (Map.Entry<String, double[]> e : update.entrySet()) {
      Sparsifier.Pick pick = sparsifier == null ? new Sparsifier.Pick(null, e.getValue())
          : sparsifier.pick(e.getValue(), rng);
      ValueCoder.Section section = values.encode(pick.values(), rng);
      wire.add(layout(e.getKey(), shapes.get(e.getKey()), pick.indices(), section));
      indices.put(e.getKey(), pick.indices());
      sent.put(e.getKey(), section.decoded());
    }
    if (feedback != null) {
      Object version = meta.get("base_version");
      Integer base = version instanceof Integer || version instanceof Long ? ((Number) version).intValue() : null;
      feedback.keep(update, indices, sent, base);
    }
    wire.addAll(kept);
    return WireFormat.encode("update", meta, wire, config.compress);
  }

  private static List<WireTensor> stateTensors(Map<String, Tensor> state) {
    List<WireTensor> out = new ArrayList<>();
    for (Map.Entry<String, Tensor> e : state.entrySet()) {
      Tensor t = e.getValue();
      if (t.dtype().isFloat) {
        double[] v = t.doubles();
        for (double x : v) {
          if (!Double.isFinite(x)) {
            throw new NonFiniteUpdateException("state '" + e.getKey() + "' holds NaN or Inf; refusing to send it");
          }
        }
        t = Tensor.ofDoubles(t.name(), DType.FLOAT32, t.shape(), v);
      } else if (t.dtype() != DType.INT64) { // int32 values as int64 (exact)
        t = Tensor.ofLongs(t.name(), DType.INT64, t.shape(),
            Arrays.stream(t.doubles()).mapToLong(x -> (long) x).toArray());
      }
      out.add(new WireTensor(STATE_PREFIX + e.getKey(), t.dtype(), t.shape(), "dense", new LinkedHashMap<>(), t.bytes()));
    }
    return out;
  }

  /** Not sparsified: dense (float32) or quant; sparsified: sparse, with the shorter index coding. */
  private WireTensor layout(String name, int[] shape, int[] idx, ValueCoder.Section section) {
    if (idx == null) {
      return new WireTensor(name, DType.FLOAT32, shape, values.bits == 32 ? "dense" : "quant", section.fields(),
          section.blob());
    }
    int size = Tensor.count(shape);
    boolean varint = IndexCoding.varintBytes(idx) < (size + 7) / 8; // a tie goes to the bitmap
    byte[] index = varint ? IndexCoding.varints(idx) : IndexCoding.bitmap(idx, size);
    Map<String, Object> fields = new LinkedHashMap<>();
    fields.put("nnz", idx.length);
    fields.put("index", varint ? "varint" : "bitmap");
    fields.put("bits", values.bits);
    fields.putAll(section.fields()); // "chunk" when quantized ("bits" is already in place)
    byte[] blob = new byte[index.length + section.blob().length];
    System.arraycopy(index, 0, blob, 0, index.length);
    System.arraycopy(section.blob(), 0, blob, index.length, section.blob().length);
    return new WireTensor(name, DType.FLOAT32, shape, "sparse", fields, blob);
  }

  /** meta.base_version of the last encoded update (staleness = new base - this), or null. */
  public Integer residualBaseVersion() {
    return feedback == null ? null : feedback.baseVersion();
  }

  /** The current residual (binary64), empty without error feedback. */
  public Map<String, double[]> residual() {
    return feedback == null ? new LinkedHashMap<>() : feedback.residual();
  }

  /**
   * Undo the residual change of the last {@link #encode}: the upload failed and nothing was
   * merged. Privacy is not refunded: the release may still have been seen.
   */
  public void rollback() {
    if (feedback != null) {
      feedback.rollback();
    }
  }

  /** What one encode costs in local DP: mechanism and z, or null without noise. */
  public PrivacyAccountant.Release release() {
    return noiseMultiplier == null ? null : new PrivacyAccountant.Release(config.noise, noiseMultiplier);
  }

  public EncoderConfig config() {
    return config;
  }
}
