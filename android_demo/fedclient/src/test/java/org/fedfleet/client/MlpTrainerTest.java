package org.fedfleet.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.fedfleet.wire.Tensor;
import org.junit.jupiter.api.Test;

/** Hand-written backprop checked against finite differences, and real learning on the bundled digits. */
class MlpTrainerTest {
  /** torch.nn.Linear's default init, U(+-1/sqrt(fan_in)), from a seeded generator. */
  static Map<String, Tensor> mlp(int in, int hidden, int out, long seed) {
    Random r = new Random(seed);
    Map<String, Tensor> p = new LinkedHashMap<>();
    int[][] shapes = {{hidden, in}, {hidden}, {out, hidden}, {out}};
    String[] names = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};
    for (int k = 0; k < 4; k++) {
      int fanIn = k < 2 ? in : hidden;
      float[] v = new float[Tensor.count(shapes[k])];
      for (int i = 0; i < v.length; i++) {
        v[i] = (float) ((r.nextDouble() * 2 - 1) / Math.sqrt(fanIn));
      }
      p.put(names[k], Tensor.ofFloats(names[k], shapes[k], v));
    }
    return p;
  }

  @Test
  void gradientsMatchFiniteDifferences() throws Exception {
    Dataset data = Digits.bundled().take(6);
    Map<String, Tensor> params = mlp(64, 5, 10, 1);
    List<MlpTrainer.Layer> layers = MlpTrainer.layers(params, 64);
    Map<String, float[]> w = new LinkedHashMap<>();
    params.forEach((n, t) -> w.put(n, t.floats()));
    int[] order = {0, 1, 2, 3, 4, 5};
    Map<String, double[]> grads = new LinkedHashMap<>();
    new Mlp(layers, w).lossAndGradients(data, order, 0, 6, grads);
    Random pick = new Random(2);
    for (String name : w.keySet()) {
      for (int trial = 0; trial < 8; trial++) {
        int i = pick.nextInt(w.get(name).length);
        float saved = w.get(name)[i];
        double h = 1e-2;
        w.get(name)[i] = (float) (saved + h);
        double up = new Mlp(layers, w).lossAndGradients(data, order, 0, 6, new LinkedHashMap<>());
        w.get(name)[i] = (float) (saved - h);
        double down = new Mlp(layers, w).lossAndGradients(data, order, 0, 6, new LinkedHashMap<>());
        w.get(name)[i] = saved;
        double numeric = (up - down) / (2 * h);
        assertEquals(numeric, grads.get(name)[i], 2e-3 + 2e-2 * Math.abs(numeric), name + "[" + i + "]");
      }
    }
  }

  @Test
  void learnsDigits() throws Exception {
    Dataset all = Digits.bundled();
    Dataset train = all.shard(0, 3).take(400);
    Dataset test = all.shard(1, 3);
    Map<String, Tensor> params = mlp(64, 32, 10, 3);
    double before = MlpTrainer.accuracy(params, test);
    TrainPlan plan = new TrainPlan(15, 8, 0.1, 0.0, Map.of());
    Trainer.Result r = new MlpTrainer(train).train(params, plan, new Random(4));
    Map<String, Tensor> trained = new LinkedHashMap<>();
    r.params().forEach((n, v) -> trained.put(n, Tensor.ofFloats(n, params.get(n).shape(), v)));
    double after = MlpTrainer.accuracy(trained, test);
    assertTrue(before < 0.3 && after > 0.85, "accuracy " + before + " -> " + after);
    assertEquals(15 * 25, r.steps()); // 200 examples in batches of 8, 15 epochs
    assertEquals(train.size(), r.numExamples());
    assertTrue(r.loss() < 1.2 && Double.isFinite(r.loss()), "mean loss " + r.loss());
  }

  @Test
  void proximalTermKeepsWeightsNearTheGlobalModel() throws Exception {
    Dataset data = Digits.bundled().take(64);
    Map<String, Tensor> params = mlp(64, 32, 10, 5);
    double free = distance(params, new MlpTrainer(data).train(params, new TrainPlan(3, 8, 0.1, 0.0, Map.of()), new Random(1)));
    double prox = distance(params, new MlpTrainer(data).train(params, new TrainPlan(3, 8, 0.1, 5.0, Map.of()), new Random(1)));
    assertTrue(prox < free, prox + " vs " + free);
  }

  @Test
  void leavesItsInputAloneAndRefusesOtherModels() throws Exception {
    Dataset data = Digits.bundled().take(16);
    Map<String, Tensor> params = mlp(64, 8, 10, 6);
    float[] before = params.get("fc1.weight").floats();
    new MlpTrainer(data).train(params, new TrainPlan(1, 4, 0.5, 0.0, Map.of()), new Random(0));
    assertArrayEquals(before, params.get("fc1.weight").floats());
    Map<String, Tensor> cnn = new LinkedHashMap<>();
    cnn.put("conv1.weight", Tensor.ofFloats("conv1.weight", new int[] {16, 1, 3, 3}, new float[144]));
    cnn.put("conv1.bias", Tensor.ofFloats("conv1.bias", new int[] {16}, new float[16]));
    IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
        () -> new MlpTrainer(data).train(cnn, new TrainPlan(1, 4, 0.5, 0.0, Map.of()), new Random(0)));
    assertTrue(e.getMessage().contains("chains of linear layers"), e.getMessage());
  }

  private static double distance(Map<String, Tensor> a, Trainer.Result b) {
    double s = 0;
    for (String n : a.keySet()) {
      float[] x = a.get(n).floats();
      float[] y = b.params().get(n);
      for (int i = 0; i < x.length; i++) {
        s += (x[i] - y[i]) * (x[i] - y[i]);
      }
    }
    return Math.sqrt(s);
  }
}
