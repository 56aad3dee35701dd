package org.fedfleet.client;

import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.Map;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * Typed reads of the server's JSON answers. org.json's getters coerce ("5" becomes 5, 2.7
 * becomes 2); these do not, so an answer the Python client would refuse is refused here too,
 * with a {@link BadAnswerException} naming the key.
 */
final class Answers {
  private Answers() {}

  static JSONObject object(byte[] body) throws BadAnswerException {
    try {
      return new JSONObject(new String(body, java.nio.charset.StandardCharsets.UTF_8));
    } catch (JSONException e) {
      throw new BadAnswerException("not a JSON object: " + e.getMessage());
    }
  }

  static int integer(JSONObject o, String key) throws BadAnswerException {
    Object v = o.opt(key);
    if ((v instanceof Integer || v instanceof Long) && ((Number) v).longValue() == ((Number) v).intValue()) {
      return ((Number) v).intValue();
    }
    throw new BadAnswerException("'" + key + "' must be an integer, got " + v);
  }

  static double number(JSONObject o, String key, double fallback) throws BadAnswerException {
    Object v = o.opt(key);
    if (v == null || v == JSONObject.NULL) {
      return fallback;
    }
    if (v instanceof Integer || v instanceof Long || v instanceof Double) {
      double d = ((Number) v).doubleValue();
      if (Double.isFinite(d)) {
        return d;
      }
    }
    throw new BadAnswerException("'" + key + "' must be a finite number, got " + v);
  }

  static String string(JSONObject o, String key) throws BadAnswerException {
    if (o.opt(key) instanceof String s) {
      return s;
    }
    throw new BadAnswerException("'" + key + "' must be a string, got " + o.opt(key));
  }

  static JSONObject child(JSONObject o, String key) throws BadAnswerException {
    if (o.opt(key) instanceof JSONObject c) {
      return c;
    }
    throw new BadAnswerException("'" + key + "' must be an object, got " + o.opt(key));
  }

  static JSONArray array(JSONObject o, String key) throws BadAnswerException {
    if (o.opt(key) instanceof JSONArray a) {
      return a;
    }
    throw new BadAnswerException("'" + key + "' must be a list, got " + o.opt(key));
  }

  static int[] ints(JSONArray a, String what) throws BadAnswerException {
    int[] out = new int[a.length()];
    for (int i = 0; i < out.length; i++) {
      Object v = a.opt(i);
      if (!(v instanceof Integer n) || n < 0) {
        throw new BadAnswerException(what + " must hold non-negative integers, got " + v);
      }
      out[i] = n;
    }
    return out;
  }

  /** A flat JSON object as a map of Java values (JSON null becomes null), e.g. the codec. */
  static Map<String, Object> flatMap(JSONObject o) throws BadAnswerException {
    Map<String, Object> out = new LinkedHashMap<>();
    for (Iterator<String> it = o.keys(); it.hasNext(); ) {
      String key = it.next();
      Object v = o.opt(key);
      if (v instanceof JSONObject || v instanceof JSONArray) {
        throw new BadAnswerException("'" + key + "' must be a plain value");
      }
      out.put(key, v == JSONObject.NULL ? null : v);
    }
    return out;
  }
}
