package org.fedfleet.client;

import java.util.Map;
import org.json.JSONObject;

/**
 * The local-training part of a task ({@code ServerConfig.train_plan()}): plain SGD settings and
 * the codec the update must be encoded with (keys of {@code EncoderConfig}); {@code secureAgg}: the
 * update goes masked through secure aggregation's steps (SecureRound) instead of the codec.
 */
public record TrainPlan(int localEpochs, int batchSize, double lr, double proxMu, Map<String, Object> codec,
    boolean secureAgg) {
  /** A plan of a plain (not secure) round. */
  public TrainPlan(int localEpochs, int batchSize, double lr, double proxMu, Map<String, Object> codec) {
    this(localEpochs, batchSize, lr, proxMu, codec, false);
  }

  public TrainPlan {
    if (localEpochs < 1 || batchSize < 1 || !(lr > 0 && Double.isFinite(lr)) || !(proxMu >= 0)) {
      throw new IllegalArgumentException("local_epochs and batch_size must be >= 1, lr > 0, prox_mu >= 0");
    }
  }

  static TrainPlan parse(JSONObject o) throws BadAnswerException {
    try {
      JSONObject codec = o.has("codec") ? Answers.child(o, "codec") : new JSONObject();
      return new TrainPlan(Answers.integer(o, "local_epochs"), Answers.integer(o, "batch_size"),
          Answers.number(o, "lr", Double.NaN), Answers.number(o, "prox_mu", 0.0), Answers.flatMap(codec),
          o.optBoolean("secure_agg", false));
    } catch (IllegalArgumentException e) {
      throw new BadAnswerException("train plan: " + e.getMessage());
    }
  }
}
