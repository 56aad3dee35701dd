package org.fedfleet.client;

import java.util.Map;
import java.util.Random;
import org.fedfleet.wire.Tensor;

/**
 * Local training, the seam between the protocol client and a runtime: the JVM's {@link
 * MlpTrainer}, or on Android an ExecuTorch {@code TrainingModule} (the app's
 * ExecuTorchTrainer). The trainer owns the phone's private data; only parameters cross.
 */
public interface Trainer {
  /** What {@code /v1/register} reports as the phone's runtime. */
  String runtime();

  /** Local examples, the update's aggregation weight. */
  int numExamples();

  /**
   * Trains from {@code params} (the downloaded model, name to float32 tensor) with plain SGD as
   * {@code plan} says, drawing batch order from {@code rng}. Returns the new parameters, same
   * names and sizes; the inputs are not modified.
   */
  Result train(Map<String, Tensor> params, TrainPlan plan, Random rng);

  /** New parameters (flat, C order), mean training loss over the task's steps, examples, steps. */
  record Result(Map<String, float[]> params, double loss, int numExamples, int steps) {}
}
