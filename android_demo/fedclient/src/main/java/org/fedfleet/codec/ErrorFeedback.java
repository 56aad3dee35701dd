package org.fedfleet.codec;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Error feedback: what an update did not deliver is kept and added to the next one.
 *
 * <p>EF-SGD (Stich et al., 2018, "Sparsified SGD with Memory"; Karimireddy et al., 2019, "Error
 * Feedback Fixes SignSGD"): with corrected = delta + decay^staleness * residual, the phone sends
 * C(corrected) and keeps residual = corrected - decoded(C(corrected)) in binary64, so no mass is
 * lost, only delayed. The residual only ever holds post-noise values, so it costs no privacy.
 */
final class ErrorFeedback {
  private final double decay;
  private Map<String, double[]> residual = new LinkedHashMap<>();
  private Integer baseVersion; // model version the residual was made against
  private Map<String, double[]> savedResidual;
  private Integer savedBase;

  ErrorFeedback(double decay) {
    this.decay = decay;
  }

  /** corrected = update + decay^staleness * residual, where shapes match (others are dropped). */
  void addTo(Map<String, double[]> update, int staleness) {
    savedResidual = residual;
    savedBase = baseVersion;
    double factor = Math.pow(decay, staleness);
    if (factor == 0) {
      return;
    }
    for (Map.Entry<String, double[]> e : update.entrySet()) {
      double[] r = residual.get(e.getKey());
      double[] a = e.getValue();
      if (r != null && r.length == a.length) {
        for (int i = 0; i < a.length; i++) {
          a[i] += factor * r[i];
        }
      }
    }
  }

  /** residual = corrected - what the server decodes ({@code sent[name]} at {@code indices[name]}). */
  void keep(Map<String, double[]> corrected, Map<String, int[]> indices, Map<String, float[]> sent, Integer version) {
    Map<String, double[]> next = new LinkedHashMap<>();
    for (Map.Entry<String, double[]> e : corrected.entrySet()) {
      double[] r = e.getValue().clone();
      int[] idx = indices.get(e.getKey());
      float[] s = sent.get(e.getKey());
      for (int i = 0; i < s.length; i++) {
        r[idx == null ? i : idx[i]] -= s[i];
      }
      next.put(e.getKey(), r);
    }
    residual = next;
    baseVersion = version;
  }

  /** Undo the last {@link #addTo}/{@link #keep} pair: the upload it made was not merged. */
  void rollback() {
    if (savedResidual != null) {
      residual = savedResidual;
      baseVersion = savedBase;
      savedResidual = null;
    }
  }

  Integer baseVersion() {
    return baseVersion;
  }

  Map<String, double[]> residual() {
    Map<String, double[]> copy = new LinkedHashMap<>();
    residual.forEach((k, v) -> copy.put(k, v.clone()));
    return copy;
  }
}
