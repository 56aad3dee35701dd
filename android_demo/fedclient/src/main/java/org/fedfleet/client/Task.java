package org.fedfleet.client;

import java.util.LinkedHashMap;
import java.util.Map;
import org.fedfleet.wire.DType;
import org.fedfleet.wire.TensorSpec;
import org.fedfleet.wire.WireException;
import org.json.JSONArray;
import org.json.JSONObject;

/** What {@code /v1/register} and {@code /v1/task} describe: the model, its parameters, the plan. */
public record Task(String model, int[] inputShape, int numClasses, Map<String, TensorSpec> params, TrainPlan train,
                   double dpDelta, long maxUpdateBytes) {

  static Task parse(JSONObject o) throws BadAnswerException {
    Map<String, TensorSpec> params = new LinkedHashMap<>();
    JSONArray list = Answers.array(o, "params");
    for (int i = 0; i < list.length(); i++) {
      if (!(list.opt(i) instanceof JSONObject p)) {
        throw new BadAnswerException("params[" + i + "] must be an object");
      }
      try {
        DType dtype = DType.fromWire(Answers.string(p, "dtype"));
        params.put(Answers.string(p, "name"), new TensorSpec(Answers.ints(Answers.array(p, "shape"), "shape"), dtype));
      } catch (WireException e) {
        throw new BadAnswerException("params[" + i + "]: " + e.getMessage());
      }
    }
    return new Task(Answers.string(o, "model"), Answers.ints(Answers.array(o, "input_shape"), "input_shape"),
        Answers.integer(o, "num_classes"), params, TrainPlan.parse(Answers.child(o, "train")),
        Answers.number(o, "dp_delta", 1e-5), (long) Answers.number(o, "max_update_bytes", 16 << 20));
  }
}
