package org.fedfleet.client;

import org.fedfleet.wire.Message;
import org.json.JSONObject;

/**
 * A check-in answer: {@code train} (with round, version, deadline and plan), {@code wait} (come
 * back after {@code retryAfterS}) or {@code done}. Anything else is a {@link BadAnswerException}.
 * {@code model} is the task's model when it came inside the answer (FORMAT.md section 9, "The
 * model inside the check-in answer"), already checked against the task; null otherwise.
 */
public record Checkin(String action, int round, int version, double deadlineS, TrainPlan train, double retryAfterS,
                      Message model) {
  static Checkin parse(JSONObject o) throws BadAnswerException {
    String action = Answers.string(o, "action");
    return switch (action) {
      case "train" -> new Checkin(action, Answers.integer(o, "round"), Answers.integer(o, "version"),
          Answers.number(o, "deadline_s", 0.0), TrainPlan.parse(Answers.child(o, "train")), 0.0, null);
      case "wait" -> {
        double after = Answers.number(o, "retry_after_s", 1.0);
        yield new Checkin(action, 0, 0, 0.0, null, Math.max(0.0, Math.min(after, 600.0)), null);
      }
      case "done" -> new Checkin(action, 0, 0, 0.0, null, 0.0, null);
      default -> throw new BadAnswerException("unknown check-in action '" + action + "'");
    };
  }

  /** This answer with the model that carried it. */
  Checkin withModel(Message m) {
    return new Checkin(action, round, version, deadlineS, train, retryAfterS, m);
  }
}
