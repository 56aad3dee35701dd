package org.fedfleet.client;

import org.json.JSONException;
import org.json.JSONObject;

/** What one phone saw, from its side of the wire (the Python client's PhoneStats, plus status). */
public final class PhoneStats {
  public final String phone;
  public int examples;
  public int participations;
  public int rejected; // uploads the server refused with 409 (round closed, stale base)
  public int refused; // updates this phone would not send (NaN/Inf after training)
  public int errors;
  public int checkins; // check-in answers acted on, POST /v1/checkin's and those that came with an upload
  public int chainedCheckins; // of those, the ones that came with an upload (no request of their own)
  public int inlineModels; // models that came inside a check-in's answer (no download of their own)
  public int modelDownloads; // GET /v1/model requests answered (200, or 304 for the cached copy)
  public long bytesUp;
  public long bytesDown;
  public int lastVersion = -1; // model version of the last task (downloaded or inline)
  public int lastRound;
  public double lastLoss = Double.NaN;
  public double epsilon; // local-DP epsilon this phone has spent (its own accountant)

  PhoneStats(String phone) {
    this.phone = phone;
  }

  /** One JSON line, for Main's summary and the app's status screen. */
  public String toJson() {
    try {
      JSONObject o = new JSONObject();
      o.put("phone", phone);
      o.put("examples", examples);
      o.put("participations", participations);
      o.put("rejected", rejected);
      o.put("refused", refused);
      o.put("errors", errors);
      o.put("checkins", checkins);
      o.put("chained_checkins", chainedCheckins);
      o.put("inline_models", inlineModels);
      o.put("model_downloads", modelDownloads);
      o.put("bytes_up", bytesUp);
      o.put("bytes_down", bytesDown);
      o.put("last_version", lastVersion);
      o.put("last_round", lastRound);
      o.put("train_loss", Double.isNaN(lastLoss) ? JSONObject.NULL : lastLoss);
      o.put("epsilon", epsilon);
      return o.toString();
    } catch (JSONException e) {
      throw new IllegalStateException(e); // only thrown for NaN/Inf numbers, which are never put
    }
  }
}
