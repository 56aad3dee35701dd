package org.fedfleet.client;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.fedfleet.wire.Tensor;

/**
 * Plain-Java training of a chain of linear layers with ReLU between them (softmax regression
 * for one layer; the server's {@code --model mlp} is fc1 [32, 64] -> ReLU -> fc2 [10, 32]), so a
 * JVM phone trains for real. Loss: mean cross-entropy of the batch, as
 * {@code torch.nn.functional.cross_entropy}; optimizer: plain SGD with the task's lr, plus the
 * FedProx term mu/2 ||w - w_global||^2 (Li et al., 2020) when prox_mu > 0. Forward and backward
 * are written out by hand; a finite-difference test checks the gradients.
 */
public final class MlpTrainer implements Trainer {
  private final Dataset data;

  public MlpTrainer(Dataset data) {
    this.data = data;
  }

  @Override
  public String runtime() {
    return "java-mlp";
  }

  @Override
  public int numExamples() {
    return data.size();
  }

  /** One linear layer: weight [out, in] row-major and bias [out], by their wire names. */
  record Layer(String weightName, String biasName, int in, int out) {}

  /** The layers, in parameter order: "X.weight" [out, in] followed by "X.bias" [out]. */
  static List<Layer> layers(Map<String, Tensor> params, int features) {
    List<Layer> layers = new ArrayList<>();
    List<String> names = new ArrayList<>(params.keySet());
    int in = features;
    for (int i = 0; i < names.size(); i += 2) {
      String w = names.get(i);
      String b = i + 1 < names.size() ? names.get(i + 1) : "";
      int[] ws = params.get(w).shape();
      String prefix = w.endsWith(".weight") ? w.substring(0, w.length() - ".weight".length()) : null;
      if (prefix == null || !b.equals(prefix + ".bias") || ws.length != 2 || ws[1] != in
          || params.get(b).size() != ws[0]) {
        throw new IllegalArgumentException("MlpTrainer trains chains of linear layers (X.weight [out, in], X.bias "
            + "[out]) on " + features + " features; this model's parameters are " + names);
      }
      layers.add(new Layer(w, b, ws[1], ws[0]));
      in = ws[0];
    }
    return layers;
  }

  @Override
  public Result train(Map<String, Tensor> params, TrainPlan plan, Random rng) {
    List<Layer> layers = layers(params, data.features());
    Map<String, float[]> w = new LinkedHashMap<>();
    Map<String, float[]> anchor = new LinkedHashMap<>();
    params.forEach((name, t) -> {
      w.put(name, t.floats());
      anchor.put(name, t.floats());
    });
    Mlp net = new Mlp(layers, w);
    double total = 0;
    int steps = 0;
    int n = data.size();
    int[] order = new int[n];
    for (int epoch = 0; epoch < plan.localEpochs(); epoch++) {
      shuffle(order, rng);
      for (int start = 0; start < n; start += plan.batchSize()) {
        int end = Math.min(n, start + plan.batchSize());
        Map<String, double[]> grads = new LinkedHashMap<>();
        total += net.lossAndGradients(data, order, start, end, grads);
        sgdStep(w, anchor, grads, plan);
        steps++;
      }
    }
    return new Result(w, total / Math.max(steps, 1), n, steps);
  }

  /** w -= lr * (grad + mu * (w - w_global)). */
  private static void sgdStep(Map<String, float[]> w, Map<String, float[]> anchor, Map<String, double[]> grads,
                              TrainPlan plan) {
    for (Map.Entry<String, float[]> e : w.entrySet()) {
      float[] p = e.getValue();
      float[] a = anchor.get(e.getKey());
      double[] g = grads.get(e.getKey());
      for (int i = 0; i < p.length; i++) {
        p[i] -= (float) (plan.lr() * (g[i] + plan.proxMu() * (p[i] - a[i])));
      }
    }
  }

  /** A fresh permutation of 0..n-1 per epoch (Fisher-Yates). */
  private static void shuffle(int[] order, Random rng) {
    for (int i = 0; i < order.length; i++) {
      order[i] = i;
    }
    for (int i = order.length - 1; i > 0; i--) {
      int j = rng.nextInt(i + 1);
      int t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
  }

  /** Classification accuracy of {@code params} on {@code test} (for tests and the app's status). */
  public static double accuracy(Map<String, Tensor> params, Dataset test) {
    Map<String, float[]> w = new LinkedHashMap<>();
    params.forEach((name, t) -> w.put(name, t.floats()));
    Mlp net = new Mlp(layers(params, test.features()), w);
    int correct = 0;
    for (int i = 0; i < test.size(); i++) {
      double[] logits = net.forward(test.x()[i], null);
      int best = 0;
      for (int c = 1; c < logits.length; c++) {
        best = logits[c] > logits[best] ? c : best;
      }
      correct += best == test.y()[i] ? 1 : 0;
    }
    return (double) correct / test.size();
  }
}
