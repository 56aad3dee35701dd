package org.fedfleet.wire;

import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Strict JSON, as the header decoder needs it (FORMAT.md section 2): UTF-8 only, no duplicate
 * keys, no NaN/Infinity, nothing after the value. A general parser (Android's org.json) accepts
 * unquoted strings, single quotes and repeated keys, so two receivers could read one header two
 * ways; this one reads it the way Python's {@code json.loads} does, or not at all.
 *
 * <p>Values: {@code Map<String, Object>} (key order kept), {@code List<Object>}, {@code String},
 * {@code Long} (or {@code BigInteger} past 64 bits) for numbers without fraction or exponent,
 * {@code Double} otherwise, {@code Boolean}, and {@code null}.
 */
public final class Json {
  private static final int MAX_DEPTH = 512; // Python gives up near 1000 (RecursionError)
  private final String text;
  private int pos;

  private Json(String text) {
    this.text = text;
  }

  /** Decodes UTF-8 strictly (invalid sequences are an error, not U+FFFD), then parses. */
  public static Object parse(byte[] utf8) throws WireException {
    String text;
    try {
      text = StandardCharsets.UTF_8.newDecoder()
          .onMalformedInput(CodingErrorAction.REPORT)
          .onUnmappableCharacter(CodingErrorAction.REPORT)
          .decode(ByteBuffer.wrap(utf8))
          .toString();
    } catch (CharacterCodingException e) {
      throw WireException.malformed("header is not valid UTF-8");
    }
    return parse(text);
  }

  public static Object parse(String text) throws WireException {
    Json p = new Json(text);
    p.skipSpace();
    Object value = p.value(0);
    p.skipSpace();
    if (p.pos != text.length()) {
      throw p.error("extra data after the JSON value");
    }
    return value;
  }

  private Object value(int depth) throws WireException {
    if (depth > MAX_DEPTH) {
      throw error("nested too deeply");
    }
    if (pos >= text.length()) {
      throw error("unexpected end of JSON");
    }
    char c = text.charAt(pos);
    return switch (c) {
      case '{' -> object(depth);
      case '[' -> array(depth);
      case '"' -> string();
      case 't' -> literal("true", Boolean.TRUE);
      case 'f' -> literal("false", Boolean.FALSE);
      case 'n' -> literal("null", null);
      default -> {
        if (c == '-' || (c >= '0' && c <= '9')) {
          yield number();
        }
        throw error("unexpected character '" + c + "'"); // NaN, Infinity and friends end here
      }
    };
  }

  private Map<String, Object> object(int depth) throws WireException {
    Map<String, Object> out = new LinkedHashMap<>();
    pos++; // '{'
    skipSpace();
    if (peek('}')) {
      pos++;
      return out;
    }
    while (true) {
      skipSpace();
      if (!peek('"')) {
        throw error("object keys must be strings");
      }
      String key = string();
      skipSpace();
      expect(':');
      skipSpace();
      Object v = value(depth + 1);
      if (out.containsKey(key)) {
        throw error("repeats the key \"" + key + "\" within one object");
      }
      out.put(key, v);
      skipSpace();
      if (peek(',')) {
        pos++;
      } else {
        expect('}');
        return out;
      }
    }
  }

  private List<Object> array(int depth) throws WireException {
    List<Object> out = new ArrayList<>();
    pos++; // '['
    skipSpace();
    if (peek(']')) {
      pos++;
      return out;
    }
    while (true) {
      skipSpace();
      out.add(value(depth + 1));
      skipSpace();
      if (peek(',')) {
        pos++;
      } else {
        expect(']');
        return out;
      }
    }
  }

  private String string() throws WireException {
    pos++; // opening quote
    StringBuilder sb = new StringBuilder();
    while (true) {
      if (pos >= text.length()) {
        throw error("unterminated string");
      }
      char c = text.charAt(pos++);
      if (c == '"') {
        return sb.toString();
      }
      if (c < 0x20) {
        throw error("control character in a string");
      }
      if (c != '\\') {
        sb.append(c);
        continue;
      }
      if (pos >= text.length()) {
        throw error("unterminated escape");
      }
      char e = text.charAt(pos++);
      switch (e) {
        case '"', '\\', '/' -> sb.append(e);
        case 'b' -> sb.append('\b');
        case 'f' -> sb.append('\f');
        case 'n' -> sb.append('\n');
        case 'r' -> sb.append('\r');
        case 't' -> sb.append('\t');
        case 'u' -> sb.append(hex4());
        default -> throw error("invalid escape \\" + e);
      }
    }
  }

  private char hex4() throws WireException {
    if (pos + 4 > text.length()) {
      throw error("truncated \\u escape");
    }
    int v = 0;
    for (int i = 0; i < 4; i++) {
      int d = Character.digit(text.charAt(pos++), 16);
      if (d < 0) {
        throw error("invalid \\u escape");
      }
      v = v * 16 + d;
    }
    return (char) v;
  }

  private Object number() throws WireException {
    int start = pos;
    if (peek('-')) {
      pos++;
    }
    if (peek('0')) {
      pos++;
    } else if (!digits()) {
      throw error("invalid number");
    }
    boolean integral = true;
    if (peek('.')) {
      pos++;
      integral = false;
      if (!digits()) {
        throw error("invalid number");
      }
    }
    if (peek('e') || peek('E')) {
      pos++;
      integral = false;
      if (peek('+') || peek('-')) {
        pos++;
      }
      if (!digits()) {
        throw error("invalid number");
      }
    }
    String literal = text.substring(start, pos);
    if (integral) {
      BigInteger big = new BigInteger(literal);
      return big.bitLength() < 64 ? (Object) big.longValue() : big;
    }
    double d = Double.parseDouble(literal);
    if (Double.isInfinite(d)) {
      throw error("number " + literal + " is out of the binary64 range");
    }
    return d;
  }

  private boolean digits() {
    int start = pos;
    while (pos < text.length() && text.charAt(pos) >= '0' && text.charAt(pos) <= '9') {
      pos++;
    }
    return pos > start;
  }

  private Object literal(String word, Object value) throws WireException {
    if (!text.startsWith(word, pos)) {
      throw error("invalid literal");
    }
    pos += word.length();
    return value;
  }

  private void skipSpace() {
    while (pos < text.length()) {
      char c = text.charAt(pos);
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
        return;
      }
      pos++;
    }
  }

  private boolean peek(char c) {
    return pos < text.length() && text.charAt(pos) == c;
  }

  private void expect(char c) throws WireException {
    if (!peek(c)) {
      throw error("expected '" + c + "'");
    }
    pos++;
  }

  private WireException error(String what) {
    return WireException.malformed("header is not valid JSON: " + what + " at offset " + pos);
  }
}
