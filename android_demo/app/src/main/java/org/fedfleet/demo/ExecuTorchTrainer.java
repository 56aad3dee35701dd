package org.fedfleet.demo;

import java.io.File;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Random;
import org.fedfleet.client.Dataset;
import org.fedfleet.client.TrainPlan;
import org.fedfleet.client.Trainer;
import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Tensor;
import org.pytorch.executorch.training.SGD;
import org.pytorch.executorch.training.TrainingModule;

/**
 * Trains the bundle's {@code model.pte} (the ExecuTorch training program `fedfleet export`
 * writes) with {@link TrainingModule} and the runtime's {@link SGD}, as the Python
 * ExecuTorchRuntime does: the program's first output is the batch's mean loss, gradients come
 * from {@code namedGradients}, and its parameters are named "model." + the wire name. Written
 * against the Kotlin API of executorch-android 1.x (TrainingModule is Closeable); the older
 * Java wrappers spell close() as destroy().
 */
final class ExecuTorchTrainer implements Trainer {
  private static final String METHOD = "forward";
  private static final String PREFIX = "model."; // export/manifest.py PTE_PREFIX

  private final File program;
  private final Dataset data;
  private final long[] inputShape; // C, H, W
  private final int maxBatch; // manifest max_batch: the program plans memory for at most this

  ExecuTorchTrainer(File program, Dataset data, int[] inputShape, int maxBatch) {
    this.program = program;
    this.data = data;
    this.inputShape = new long[] {inputShape[0], inputShape[1], inputShape[2]};
    this.maxBatch = maxBatch;
  }

  @Override
  public String runtime() {
    return "executorch-android";
  }

  @Override
  public int numExamples() {
    return data.size();
  }

  @Override
  public Result train(Map<String, org.fedfleet.wire.Tensor> params, TrainPlan plan, Random rng) {
    try (TrainingModule module = TrainingModule.load(program.getAbsolutePath())) {
      // The parameter tensors are handed out only after a first forward/backward; it changes no weight.
      module.executeForwardBackward(METHOD, batch(new int[] {0}, 0, 1));
      Map<String, Tensor> weights = module.namedParameters(METHOD);
      load(weights, params);
      Map<String, float[]> anchor = plan.proxMu() > 0 ? read(module.namedParameters(METHOD)) : null;
      SGD sgd = SGD.create(weights, plan.lr());
      int size = Math.min(plan.batchSize(), maxBatch);
      int[] order = new int[data.size()];
      double total = 0;
      int steps = 0;
      for (int epoch = 0; epoch < plan.localEpochs(); epoch++) {
        shuffle(order, rng);
        for (int start = 0; start < order.length; start += size) {
          EValue[] out = module.executeForwardBackward(METHOD, batch(order, start, Math.min(order.length, start + size)));
          total += out[0].toTensor().getDataAsFloatArray()[0];
          Map<String, Tensor> grads = module.namedGradients(METHOD);
          sgd.step(anchor == null ? grads : withProx(grads, module.namedParameters(METHOD), anchor, plan.proxMu()));
          steps++;
        }
      }
      return new Result(read(module.namedParameters(METHOD)), total / Math.max(steps, 1), data.size(), steps);
    }
  }

  /**
   * Sets the program's weights to the downloaded ones. The Java API has no setter; the SGD step
   * is its one write path, so a step with lr = 1 and gradient (w - target) moves w onto the
   * target (within an ulp: w - (w - t) in float32). The delta is still taken against the
   * downloaded weights, so that ulp is part of the update, not lost.
   */
  private static void load(Map<String, Tensor> weights, Map<String, org.fedfleet.wire.Tensor> target) {
    Map<String, Tensor> grads = new LinkedHashMap<>();
    for (Map.Entry<String, Tensor> e : weights.entrySet()) {
      org.fedfleet.wire.Tensor t = target.get(e.getKey().substring(PREFIX.length()));
      float[] w = e.getValue().getDataAsFloatArray();
      if (t == null || t.size() != w.length) {
        throw new IllegalStateException("model.pte parameter " + e.getKey() + " does not match the server's model");
      }
      float[] want = t.floats();
      float[] g = new float[w.length];
      for (int i = 0; i < g.length; i++) {
        g[i] = w[i] - want[i];
      }
      grads.put(e.getKey(), Tensor.fromBlob(g, e.getValue().shape()));
    }
    SGD.create(weights, 1.0).step(grads);
  }

  /** FedProx: gradient + mu (w - w_global) (Li et al., 2020). */
  private static Map<String, Tensor> withProx(Map<String, Tensor> grads, Map<String, Tensor> weights,
                                              Map<String, float[]> anchor, double mu) {
    Map<String, Tensor> out = new LinkedHashMap<>();
    for (Map.Entry<String, Tensor> e : grads.entrySet()) {
      float[] g = e.getValue().getDataAsFloatArray();
      float[] w = weights.get(e.getKey()).getDataAsFloatArray();
      float[] a = anchor.get(e.getKey().substring(PREFIX.length()));
      for (int i = 0; i < g.length; i++) {
        g[i] += (float) (mu * (w[i] - a[i]));
      }
      out.put(e.getKey(), Tensor.fromBlob(g, e.getValue().shape()));
    }
    return out;
  }

  private static Map<String, float[]> read(Map<String, Tensor> weights) {
    Map<String, float[]> out = new LinkedHashMap<>();
    weights.forEach((name, t) -> out.put(name.substring(PREFIX.length()), t.getDataAsFloatArray()));
    return out;
  }

  /** x [B, C, H, W] float32 and y [B] int64 for examples order[start..end). */
  private EValue[] batch(int[] order, int start, int end) {
    int b = end - start;
    int features = data.features();
    float[] x = new float[b * features];
    long[] y = new long[b];
    for (int i = 0; i < b; i++) {
      System.arraycopy(data.x()[order[start + i]], 0, x, i * features, features);
      y[i] = data.y()[order[start + i]];
    }
    long[] shape = {b, inputShape[0], inputShape[1], inputShape[2]};
    return new EValue[] {EValue.from(Tensor.fromBlob(x, shape)), EValue.from(Tensor.fromBlob(y, new long[] {b}))};
  }

  /** A fresh permutation per epoch (Fisher-Yates), as MlpTrainer draws it. */
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
}
