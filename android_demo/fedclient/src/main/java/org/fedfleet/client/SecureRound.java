package org.fedfleet.client;

import java.io.IOException;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.SecureRandom;
import java.util.HexFormat;
import java.util.Map;
import java.util.Random;
import java.util.Set;
import java.util.TreeMap;
import java.util.TreeSet;
import org.fedfleet.secagg.Coords;
import org.fedfleet.secagg.IntegerCodec;
import org.fedfleet.secagg.Rotation;
import org.fedfleet.secagg.SecAggPhone;
import org.fedfleet.wire.Tensor;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * A secure round over HTTP (FORMAT.md section 12.5), as device_runtime/secagg_client.py:
 * advertise keys, share them, upload the masked integer update, answer the unmask request.
 * Returns false when the group aborted or closed without this phone (nothing of it merged).
 */
final class SecureRound {
  private static final HexFormat HEX = HexFormat.of();
  private final Http http;
  private final int round;

  SecureRound(Http http, int round) {
    this.http = http;
    this.round = round;
  }

  boolean run(Map<String, Tensor> delta, Random rng) throws IOException {
    try {
      return steps(delta, rng);
    } catch (JSONException | IllegalArgumentException e) {
      throw new BadAnswerException("secure round: " + e.getMessage());
    }
  }

  private boolean steps(Map<String, Tensor> delta, Random rng) throws IOException, JSONException {
    byte[] entropy = new byte[32];
    new SecureRandom().nextBytes(entropy);  // the phone's secrets: never from a seeded generator
    byte[][] keys = SecAggPhone.keysFor(entropy, "round/" + round + "/group/0");
    byte[] keyBody = new byte[64];  // c_pk || s_pk
    System.arraycopy(keys[0], 0, keyBody, 0, 32);
    System.arraycopy(keys[1], 0, keyBody, 32, 32);
    JSONObject joined = postBytes("/v1/secagg/advertise", keyBody);
    if (!joined.optBoolean("accepted", false)) {
      return false;
    }
    JSONObject roster = poll("/v1/secagg/roster");
    if (roster == null) {
      return false;
    }
    JSONObject p = roster.getJSONObject("params");
    int dim = p.getInt("dim");
    byte[] graphSeed = HEX.parseHex(p.getString("graph_seed"));
    byte[] group = p.getString("group").getBytes(StandardCharsets.UTF_8);
    Rotation rotation = new Rotation(graphSeed, group, dim);
    if (Rotation.rotatedDim(dim) != p.getInt("rotated_dim")) {
      throw new IllegalArgumentException("the group rotates " + dim + " values to " + p.getInt("rotated_dim")
          + ", this phone to " + Rotation.rotatedDim(dim));
    }
    // the masks cover the rotated update: D values
    SecAggPhone.Params params = new SecAggPhone.Params(p.getString("group"), p.getInt("size"), p.getInt("degree"),
        p.getInt("share_threshold"), p.getInt("min_survivors"), p.getInt("modulus_bits"), p.getInt("rotated_dim"),
        graphSeed);
    SecAggPhone phone = new SecAggPhone(params, roster.getInt("index"), entropy);
    Map<Integer, byte[][]> advertised = new TreeMap<>();
    JSONObject all = roster.getJSONObject("keys");
    for (String j : names(all)) {
      JSONArray pair = all.getJSONArray(j);
      advertised.put(Integer.parseInt(j), new byte[][] {HEX.parseHex(pair.getString(0)), HEX.parseHex(pair.getString(1))});
    }
    postBytes("/v1/secagg/shares", SecAggPhone.packSealed(phone.shareKeys(advertised)));
    JSONObject inbox = poll("/v1/secagg/inbox");
    if (inbox == null) {
      return false;
    }
    Map<Integer, byte[]> incoming = new TreeMap<>();
    JSONObject got = inbox.getJSONObject("shares");
    for (String j : names(got)) {
      incoming.put(Integer.parseInt(j), HEX.parseHex(got.getString(j)));
    }
    int fullDim = p.optInt("full_dim", dim);
    double[] x = flatten(delta, fullDim);
    if (dim < fullDim) {  // shared random-k: the group's coordinates only
      int[] coords = Coords.shared(graphSeed, group, fullDim, dim);
      double[] kept = new double[coords.length];
      for (int i = 0; i < coords.length; i++) {
        kept[i] = x[coords[i]];
      }
      x = kept;
    }
    IntegerCodec.Spec spec = new IntegerCodec.Spec(p.getDouble("clip"), p.getDouble("scale"), p.getLong("clip_bound"),
        p.getDouble("sensitivity"), p.getDouble("noise_sigma"), p.getLong("noise_tail"));
    long[] values = IntegerCodec.toIntegers(x, spec, rotation, rng);
    byte[] body = IntegerCodec.pack(phone.maskedUpload(incoming, values), params.modulusBits());
    postBytes("/v1/secagg/masked", body);
    JSONObject request = poll("/v1/secagg/unmask");
    if (request == null) {
      return false;
    }
    SecAggPhone.UnmaskShares answer = phone.unmask(ints(request.getJSONArray("survivors")),
        ints(request.getJSONArray("dropped")));
    postBytes("/v1/secagg/unmask", SecAggPhone.packUnmask(answer));
    return true;
  }

  private static double[] flatten(Map<String, Tensor> delta, int dim) {
    double[] x = new double[dim];
    int at = 0;
    for (Tensor t : delta.values()) {
      float[] v = t.floats();
      for (float f : v) {
        x[at++] = f;
      }
    }
    if (at != dim) {
      throw new IllegalArgumentException("the update has " + at + " values, the group " + dim);
    }
    return x;
  }

  private static java.util.List<String> names(JSONObject o) {
    java.util.List<String> out = new java.util.ArrayList<>();
    for (java.util.Iterator<String> it = o.keys(); it.hasNext(); ) {
      out.add(it.next());
    }
    return out;
  }

  private static Set<Integer> ints(JSONArray a) throws JSONException {
    Set<Integer> out = new TreeSet<>();
    for (int i = 0; i < a.length(); i++) {
      out.add(a.getInt(i));
    }
    return out;
  }

  /** A step message (FORMAT.md 12.5): binary, the round in the query; the JSON answer. */
  private JSONObject postBytes(String path, byte[] body) throws IOException, JSONException {
    Http.Response r = http.send("POST", path + "?round=" + round, body, "application/octet-stream", Map.of(), false);
    return Answers.object(r.body());
  }

  /** GET until the step's answer is ready; null when the group aborted. */
  private JSONObject poll(String path) throws IOException, JSONException {
    while (true) {
      Http.Response r = http.send("GET", path + "?round=" + round, null, null, Map.of(), true);
      JSONObject answer = Answers.object(r.body());
      String state = answer.optString("state");
      if ("ready".equals(state)) {
        return answer;
      }
      if ("aborted".equals(state)) {
        return null;
      }
      http.pause(Math.min(answer.optDouble("retry_after_s", 0.05), 0.05));
    }
  }
}
