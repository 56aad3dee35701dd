package org.fedfleet.codec;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.fedfleet.wire.DType;
import org.fedfleet.wire.Message;
import org.fedfleet.wire.Tensor;
import org.fedfleet.wire.WireFormat;
import org.junit.jupiter.api.Test;

/**
 * The stochastic paths, which the golden vectors can only decode: checked here against their
 * mathematical promises (error bounds, unbiasedness, noise scale, conservation under error
 * feedback), with the Java decoder as the oracle of what the server receives.
 */
class UpdateEncoderTest {
  private static final Map<String, Object> META = Map.of("update_id", "u", "base_version", 4, "num_examples", 10,
      "train_loss", 0.5, "round", 1);

  static Map<String, Tensor> delta(float[] values) {
    Map<String, Tensor> d = new LinkedHashMap<>();
    d.put("w", Tensor.ofFloats("w", new int[] {values.length}, values));
    return d;
  }

  static float[] randn(int n, long seed, double scale) {
    Random r = new Random(seed);
    float[] out = new float[n];
    for (int i = 0; i < n; i++) {
      out[i] = (float) (r.nextGaussian() * scale);
    }
    return out;
  }

  static float[] decoded(byte[] body) throws Exception {
    Message m = WireFormat.decode(body, null, 0);
    return m.tensors().get("w").floats();
  }

  static EncoderConfig config(Object... kv) {
    Map<String, Object> m = new LinkedHashMap<>();
    for (int i = 0; i < kv.length; i += 2) {
      m.put((String) kv[i], kv[i + 1]);
    }
    return EncoderConfig.fromMap(m);
  }

  @Test
  void stochasticQuantizationIsWithinBoundAndUnbiased() throws Exception {
    float[] x = randn(256, 1, 1.0);
    for (int bits : new int[] {8, 4, 2, 1}) {
      UpdateEncoder enc = new UpdateEncoder(config("quant_bits", bits, "chunk", 64), new Random(bits));
      double[] mean = new double[x.length];
      int draws = 400;
      for (int d = 0; d < draws; d++) {
        float[] y = decoded(enc.encode(delta(x), META, 0));
        for (int i = 0; i < x.length; i++) {
          double s = maxAbs(x, (i / 64) * 64, 64);
          assertTrue(Math.abs(y[i] - x[i]) <= 2 * s / ((1 << bits) - 1) * (1 + 1e-6), "bits " + bits);
          mean[i] += y[i] / draws;
        }
      }
      for (int i = 0; i < x.length; i++) {
        double s = maxAbs(x, (i / 64) * 64, 64);
        // |E - x| within 5 standard errors of a value in [x - 2s/L, x + 2s/L]
        assertEquals(x[i], mean[i], 5 * s / ((1 << bits) - 1) / Math.sqrt(draws) + 1e-6, "bits " + bits + " i " + i);
      }
    }
  }

  @Test
  void randKIsUnbiasedWithRescaling() throws Exception {
    float[] x = randn(50, 2, 1.0);
    UpdateEncoder enc = new UpdateEncoder(config("sparsify", "randk", "density", 0.2), new Random(3));
    double[] mean = new double[x.length];
    int draws = 4000;
    for (int d = 0; d < draws; d++) {
      float[] y = decoded(enc.encode(delta(x), META, 0));
      int nonzero = 0;
      for (int i = 0; i < x.length; i++) {
        mean[i] += y[i] / draws;
        nonzero += y[i] != 0 ? 1 : 0;
      }
      assertEquals(10, nonzero);
    }
    for (int i = 0; i < x.length; i++) { // each entry: n/k * x with probability k/n
      assertEquals(x[i], mean[i], 5 * Math.abs(x[i]) * Math.sqrt(4.0 / draws) + 1e-9);
    }
  }

  @Test
  void gaussianNoiseHasTheConfiguredScale() throws Exception {
    float[] zeros = new float[20000];
    UpdateEncoder enc = new UpdateEncoder(config("clip", 2.0, "noise", "gaussian", "noise_multiplier", 0.5),
        new Random(4));
    float[] y = decoded(enc.encode(delta(zeros), META, 0));
    double sum = 0;
    double sq = 0;
    for (float v : y) {
      sum += v;
      sq += v * v;
    }
    assertEquals(0.0, sum / y.length, 0.03);
    assertEquals(1.0, Math.sqrt(sq / y.length), 0.02); // sigma = z * C = 1
    assertEquals(new PrivacyAccountant.Release("gaussian", 0.5), enc.release());
  }

  @Test
  void laplaceNoiseHasTheConfiguredScale() throws Exception {
    UpdateEncoder enc = new UpdateEncoder(
        config("clip", 1.0, "clip_ord", 1, "noise", "laplace", "noise_multiplier", 2.0), new Random(5));
    float[] y = decoded(enc.encode(delta(new float[20000]), META, 0));
    double absMean = 0;
    for (float v : y) {
      absMean += Math.abs(v) / y.length;
    }
    assertEquals(2.0, absMean, 0.06); // E|X| = b = z * C
  }

  @Test
  void clippingBoundsTheNorm() throws Exception {
    float[] x = randn(100, 6, 3.0);
    float[] y = decoded(new UpdateEncoder(config("clip", 1.5), new Random(0)).encode(delta(x), META, 0));
    double norm = 0;
    for (float v : y) {
      norm += v * v;
    }
    assertEquals(1.5, Math.sqrt(norm), 1e-5);
  }

  @Test
  void errorFeedbackLosesNoMass() throws Exception {
    UpdateEncoder enc = new UpdateEncoder(config("sparsify", "topk", "density", 0.1, "quant_bits", 4,
        "error_feedback", true), new Random(7));
    double[] sentTotal = new double[300];
    double[] inputTotal = new double[300];
    for (int step = 0; step < 5; step++) {
      float[] x = randn(300, 10 + step, 1.0);
      float[] y = decoded(enc.encode(delta(x), META, 0));
      for (int i = 0; i < x.length; i++) {
        sentTotal[i] += y[i];
        inputTotal[i] += x[i];
      }
    }
    double[] residual = enc.residual().get("w"); // sent + residual == every input (decay 1, staleness 0)
    for (int i = 0; i < residual.length; i++) {
      assertEquals(inputTotal[i], sentTotal[i] + residual[i], 1e-5);
    }
    assertEquals(4, enc.residualBaseVersion());
  }

  @Test
  void rollbackRestoresTheResidual() throws Exception {
    UpdateEncoder enc = new UpdateEncoder(config("sparsify", "topk", "k", 2, "error_feedback", true), new Random(0));
    enc.encode(delta(new float[] {1, 2, 3, 4}), META, 0);
    double[] before = enc.residual().get("w");
    enc.encode(delta(new float[] {5, 1, 1, 1}), META, 0);
    assertNotEquals(before[0], enc.residual().get("w")[0]);
    enc.rollback();
    assertArrayEquals(before, enc.residual().get("w"));
  }

  @Test
  void seededEncodersAreReproducible() {
    EncoderConfig c = config("clip", 1.0, "noise", "gaussian", "noise_multiplier", 0.3, "sparsify", "topk",
        "density", 0.1, "quant_bits", 8, "error_feedback", true);
    float[] x = randn(2410, 8, 0.1);
    assertArrayEquals(new UpdateEncoder(c, new Random(9)).encode(delta(x), META, 0),
        new UpdateEncoder(c, new Random(9)).encode(delta(x), META, 0));
  }

  @Test
  void nonFiniteUpdatesAreRefusedBeforeAnythingChanges() {
    UpdateEncoder enc = new UpdateEncoder(config("quant_bits", 8, "error_feedback", true), new Random(0));
    for (float bad : new float[] {Float.NaN, Float.POSITIVE_INFINITY, Float.NEGATIVE_INFINITY}) {
      assertThrows(NonFiniteUpdateException.class, () -> enc.encode(delta(new float[] {1, bad}), META, 0));
    }
    assertEquals(Map.of(), enc.residual());
    assertEquals(null, enc.residualBaseVersion());
  }

  @Test
  void stateTravelsAfterTheUpdateAsItIsAndNonFiniteStateIsRefused() throws Exception {
    UpdateEncoder enc = new UpdateEncoder(config("quant_bits", 8, "error_feedback", true), new Random(0));
    Map<String, Tensor> state = new LinkedHashMap<>();
    state.put("bn.running_mean", Tensor.ofFloats("bn.running_mean", new int[] {2}, new float[] {0.5f, -3f}));
    state.put("bn.num_batches_tracked", Tensor.ofLongs("bn.num_batches_tracked", DType.INT64, new int[] {}, new long[] {7}));
    Message m = WireFormat.decode(enc.encode(delta(new float[] {1, 2}), state, META, 0), null, 0);
    assertEquals(List.of("w", "state:bn.running_mean", "state:bn.num_batches_tracked"), new ArrayList<>(m.tensors().keySet()));
    assertArrayEquals(new float[] {0.5f, -3f}, m.tensors().get("state:bn.running_mean").floats());
    assertArrayEquals(new double[] {7}, m.tensors().get("state:bn.num_batches_tracked").doubles());
    UpdateEncoder fresh = new UpdateEncoder(config("quant_bits", 8, "error_feedback", true), new Random(0));
    Map<String, Tensor> bad = Map.of("bn.running_var", Tensor.ofFloats("bn.running_var", new int[] {1}, new float[] {Float.NaN}));
    assertThrows(NonFiniteUpdateException.class, () -> fresh.encode(delta(new float[] {1, 2}), bad, META, 0));
    assertEquals(Map.of(), fresh.residual());
  }

  @Test
  void configRejectsWhatPythonRejects() {
    List<Object[]> bad = List.of(
        new Object[] {"clip", -1.0}, new Object[] {"noise", "gaussian"}, new Object[] {"clip", 1.0, "noise", "laplace",
            "noise_multiplier", 1.0}, new Object[] {"sparsify", "topk"}, new Object[] {"density", 0.5},
        new Object[] {"quant_bits", 3}, new Object[] {"chunk", 0}, new Object[] {"error_feedback", true},
        new Object[] {"sparsify", "randk", "k", 3, "error_feedback", true}, new Object[] {"quant_bits", 8.0},
        new Object[] {"compress", 1}, new Object[] {"nosuchkey", 1}, new Object[] {"ef_decay", 1.5},
        new Object[] {"clip", 1.0, "noise", "gaussian", "noise_multiplier", 1.0, "epsilon", 1.0});
    for (Object[] kv : bad) {
      assertThrows(IllegalArgumentException.class, () -> config(kv), java.util.Arrays.toString(kv));
    }
    EncoderConfig ok = config("clip", 1, "noise", "gaussian", "epsilon", 2.0, "delta", 1e-5);
    assertEquals(2.1491103291508313, UpdateEncoder.resolveNoiseMultiplier(ok), 1e-5); // Python's calibration
  }

  private static double maxAbs(float[] x, int start, int len) {
    double m = 0;
    for (int i = start; i < Math.min(x.length, start + len); i++) {
      m = Math.max(m, Math.abs(x[i]));
    }
    return m;
  }
}
