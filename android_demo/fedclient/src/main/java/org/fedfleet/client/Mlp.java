package org.fedfleet.client;

import java.util.List;
import java.util.Map;

/** Forward and backward of a ReLU chain of linear layers, one example at a time (phone-sized). */
final class Mlp {
  private final List<MlpTrainer.Layer> layers;
  private final Map<String, float[]> w;

  Mlp(List<MlpTrainer.Layer> layers, Map<String, float[]> w) {
    this.layers = layers;
    this.w = w;
  }

  /** Logits of one example; with {@code acts} non-null, records each layer's input (post-ReLU). */
  double[] forward(float[] x, double[][] acts) {
    double[] a = new double[x.length];
    for (int i = 0; i < x.length; i++) {
      a[i] = x[i];
    }
    for (int l = 0; l < layers.size(); l++) {
      MlpTrainer.Layer layer = layers.get(l);
      if (acts != null) {
        acts[l] = a;
      }
      float[] wt = w.get(layer.weightName());
      float[] b = w.get(layer.biasName());
      double[] z = new double[layer.out()];
      for (int o = 0; o < layer.out(); o++) {
        double s = b[o];
        int row = o * layer.in();
        for (int i = 0; i < layer.in(); i++) {
          s += wt[row + i] * a[i];
        }
        z[o] = l < layers.size() - 1 ? Math.max(0.0, s) : s; // ReLU between layers, not after the last
      }
      a = z;
    }
    return a;
  }

  /**
   * Mean cross-entropy of examples {@code order[start..end)} and its gradient w.r.t. every
   * parameter (accumulated into {@code grads}, created here).
   */
  double lossAndGradients(Dataset data, int[] order, int start, int end, Map<String, double[]> grads) {
    for (MlpTrainer.Layer layer : layers) {
      grads.put(layer.weightName(), new double[layer.out() * layer.in()]);
      grads.put(layer.biasName(), new double[layer.out()]);
    }
    int batch = end - start;
    double loss = 0;
    double[][] acts = new double[layers.size()][];
    for (int k = start; k < end; k++) {
      int idx = order[k];
      double[] logits = forward(data.x()[idx], acts);
      double[] dz = softmax(logits);
      int label = data.y()[idx];
      loss -= Math.log(Math.max(dz[label], Double.MIN_NORMAL));
      dz[label] -= 1.0;
      for (int c = 0; c < dz.length; c++) {
        dz[c] /= batch; // d(mean loss)/d logits = (softmax - onehot) / B
      }
      backward(acts, dz, grads);
    }
    return loss / batch;
  }

  private void backward(double[][] acts, double[] dz, Map<String, double[]> grads) {
    for (int l = layers.size() - 1; l >= 0; l--) {
      MlpTrainer.Layer layer = layers.get(l);
      double[] a = acts[l];
      double[] gw = grads.get(layer.weightName());
      double[] gb = grads.get(layer.biasName());
      float[] wt = w.get(layer.weightName());
      double[] da = l > 0 ? new double[layer.in()] : null;
      for (int o = 0; o < layer.out(); o++) {
        gb[o] += dz[o];
        int row = o * layer.in();
        for (int i = 0; i < layer.in(); i++) {
          gw[row + i] += dz[o] * a[i];
          if (da != null) {
            da[i] += dz[o] * wt[row + i];
          }
        }
      }
      if (da != null) {
        for (int i = 0; i < da.length; i++) {
          da[i] = a[i] > 0 ? da[i] : 0.0; // a is the ReLU output: gradient flows where it was positive
        }
      }
      dz = da;
    }
  }

  private static double[] softmax(double[] logits) {
    double max = Double.NEGATIVE_INFINITY;
    for (double v : logits) {
      max = Math.max(max, v);
    }
    double[] p = new double[logits.length];
    double sum = 0;
    for (int i = 0; i < p.length; i++) {
      p[i] = Math.exp(logits[i] - max);
      sum += p[i];
    }
    for (int i = 0; i < p.length; i++) {
      p[i] /= sum;
    }
    return p;
  }
}
