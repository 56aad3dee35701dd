package org.fedfleet.demo;

import android.content.Context;
import android.content.SharedPreferences;
import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Map;
import java.util.UUID;
import org.fedfleet.client.Dataset;
import org.fedfleet.client.Digits;
import org.fedfleet.codec.PrivacyAccountant;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * What the phone keeps across restarts: the server URL, its name and token (a name can be
 * registered once), the local-DP releases it has paid for, the last run's stats, and the
 * digits drawn on it, which never leave the phone (only model updates do).
 */
final class PhoneState {
  private static final String PREFS = "fedfleet";
  private static final String DRAWN = "drawn_digits.txt";
  private final Context context;
  private final SharedPreferences prefs;

  PhoneState(Context context) {
    this.context = context.getApplicationContext();
    this.prefs = this.context.getSharedPreferences(PREFS, Context.MODE_PRIVATE);
  }

  String server() {
    return prefs.getString("server", "");
  }

  /** A new server means a new enrollment: the old token and ledger belong to the old one. */
  void server(String url) {
    if (!url.equals(server())) {
      prefs.edit().putString("server", url).remove("token").remove("releases").remove("stats").apply();
    }
  }

  String name() {
    String name = prefs.getString("name", null);
    if (name == null) {
      name = "android-" + UUID.randomUUID().toString().substring(0, 8);
      prefs.edit().putString("name", name).apply();
    }
    return name;
  }

  String token() {
    return prefs.getString("token", null);
  }

  void token(String token) {
    prefs.edit().putString("token", token).apply();
  }

  String stats() {
    return prefs.getString("stats", null);
  }

  void stats(String json) {
    prefs.edit().putString("stats", json).apply();
  }

  boolean background() {
    return prefs.getBoolean("background", false);
  }

  void background(boolean on) {
    prefs.edit().putBoolean("background", on).apply();
  }

  PrivacyAccountant accountant() {
    PrivacyAccountant a = new PrivacyAccountant();
    try {
      JSONArray rows = new JSONArray(prefs.getString("releases", "[]"));
      for (int i = 0; i < rows.length(); i++) {
        JSONObject r = rows.getJSONObject(i);
        a.charge(new PrivacyAccountant.Release(r.getString("mechanism"), r.getDouble("z")), r.getInt("count"));
      }
    } catch (JSONException e) {
      // an unreadable ledger is reset rather than trusted
    }
    return a;
  }

  void accountant(PrivacyAccountant a) {
    JSONArray rows = new JSONArray();
    try {
      for (Map.Entry<PrivacyAccountant.Release, Integer> e : a.counts().entrySet()) {
        rows.put(new JSONObject().put("mechanism", e.getKey().mechanism()).put("z", e.getKey().noiseMultiplier())
            .put("count", e.getValue()));
      }
    } catch (JSONException e) {
      throw new IllegalStateException(e);
    }
    prefs.edit().putString("releases", rows.toString()).apply();
  }

  /** The bundled sample (so the phone can train at once) plus every digit drawn here. */
  Dataset trainingData() throws IOException {
    Dataset bundled = Digits.bundled();
    File drawn = new File(context.getFilesDir(), DRAWN);
    if (!drawn.exists()) {
      return bundled;
    }
    Dataset mine;
    try (InputStream in = new FileInputStream(drawn)) {
      mine = Digits.read(in);
    }
    ArrayList<float[]> xs = new ArrayList<>(java.util.Arrays.asList(bundled.x()));
    xs.addAll(java.util.Arrays.asList(mine.x()));
    int[] ys = new int[bundled.size() + mine.size()];
    System.arraycopy(bundled.y(), 0, ys, 0, bundled.size());
    System.arraycopy(mine.y(), 0, ys, bundled.size(), mine.size());
    return new Dataset(xs.toArray(new float[0][]), ys);
  }

  void addDrawnDigit(int label, float[] pixels) throws IOException {
    try (FileOutputStream out = new FileOutputStream(new File(context.getFilesDir(), DRAWN), true)) {
      out.write((Digits.line(label, pixels) + "\n").getBytes(StandardCharsets.US_ASCII));
    }
  }

  int drawnDigits() {
    File drawn = new File(context.getFilesDir(), DRAWN);
    if (!drawn.exists()) {
      return 0;
    }
    try (InputStream in = new FileInputStream(drawn)) {
      return Digits.read(in).size();
    } catch (IOException | IllegalArgumentException e) {
      return 0;
    }
  }
}
