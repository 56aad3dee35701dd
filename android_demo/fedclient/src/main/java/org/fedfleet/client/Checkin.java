package org.fedfleet.client;

import org.json.JSONObject;

/**
 * A check-in answer: {@code train} (with round, version, deadline and plan), {@code wait} (come
 * back after {@code retryAfterS}) or {@code done}. Anything else is a {@link BadAnswerException}.
 */
public record Checkin(String action, int round, int version, double deadlineS, TrainPlan train, double retryAfterS) {
  static Checkin parse(JSONObject o) throws BadAnswerException {
    String action = Answers.string(o, "action");
    return switch (action) {
      case "train" -> new Checkin(action, Answers.integer(o, "round"), Answers.integer(o, "version"),
          Answers.number(o, "deadline_s", 0.0), TrainPlan.parse(Answers.child(o, "train")), 0.0);
      case "wait" -> {
        double after = Answers.number(o, "retry_after_s", 1.0);
        yield new Checkin(action, 0, 0, 0.0, null, Math.max(0.0, Math.min(after, 600.0)));
      }
      case "done" -> new Checkin(action, 0, 0, 0.0, null, 0.0);
      default -> throw new BadAnswerException("unknown check-in action '" + action + "'");
    };
  }
}
