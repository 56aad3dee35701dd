package org.fedfleet.client;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InterruptedIOException;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.URI;
import java.time.Duration;
import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.time.format.DateTimeParseException;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.json.JSONObject;

/**
 * The phone's HTTP: {@link HttpURLConnection} (on Android and the JVM alike), bounded bodies,
 * the bearer token, byte counts, and retries. A 429 or 503 is retried after the server's
 * {@code Retry-After} (seconds or an HTTP date), or else after an exponential backoff with
 * jitter, so a fleet told to back off does not come back in lockstep. A refused connection is
 * always retried (nothing reached the server); other I/O failures only where a repeat is
 * harmless (GETs, and uploads, which the server deduplicates by update_id). Any other status
 * >= 400 becomes a {@link ServerException}.
 */
public final class Http {
  /** Waits; tests pass one that records instead of sleeping. */
  public interface Sleeper {
    void sleep(double seconds) throws InterruptedException;
  }

  public record Response(int status, byte[] body, Map<String, List<String>> headers) {
    public String header(String name) {
      for (Map.Entry<String, List<String>> e : headers.entrySet()) {
        if (e.getKey() != null && e.getKey().equalsIgnoreCase(name) && !e.getValue().isEmpty()) {
          return e.getValue().get(0);
        }
      }
      return null;
    }
  }

  public static final Sleeper REAL_SLEEP = s -> Thread.sleep((long) (s * 1000));

  private final String base;
  private final Sleeper sleeper;
  private final Random jitter;
  int maxAttempts = 6;
  double baseDelayS = 0.5;
  double maxDelayS = 60.0;
  long maxBodyBytes = 256L << 20; // a model message or bundle file larger than this is refused
  int timeoutMs = 60_000;
  private String token = "";
  private long bytesUp;
  private long bytesDown;

  public Http(URI server, Sleeper sleeper, Random jitter) {
    this.base = server.toString().replaceAll("/+$", "");
    this.sleeper = sleeper;
    this.jitter = jitter;
  }

  void token(String value) {
    token = value;
  }

  String token() {
    return token;
  }

  public long bytesUp() {
    return bytesUp;
  }

  public long bytesDown() {
    return bytesDown;
  }

  /** Sends with retries (see the class comment); {@code idempotent} also retries I/O failures. */
  public Response send(String method, String path, byte[] body, String contentType, Map<String, String> headers,
                       boolean idempotent) throws IOException {
    for (int attempt = 1; ; attempt++) {
      Response r;
      try {
        r = once(method, path, body, contentType, headers);
      } catch (IOException e) {
        if (!(idempotent || e instanceof java.net.ConnectException) || attempt >= maxAttempts) {
          throw e;
        }
        pause(backoff(attempt));
        continue;
      }
      if ((r.status == 429 || r.status == 503) && attempt < maxAttempts) {
        Double after = retryAfter(r.header("Retry-After"));
        pause(after != null ? Math.min(after, maxDelayS) : backoff(attempt));
        continue;
      }
      if (r.status >= 400) {
        throw serverError(r);
      }
      return r;
    }
  }

  private Response once(String method, String path, byte[] body, String contentType, Map<String, String> headers)
      throws IOException {
    HttpURLConnection c = (HttpURLConnection) URI.create(base + path).toURL().openConnection();
    try {
      c.setRequestMethod(method);
      c.setConnectTimeout(timeoutMs);
      c.setReadTimeout(timeoutMs);
      c.setUseCaches(false); // ETags are handled here, not by a platform cache
      if (!token.isEmpty()) {
        c.setRequestProperty("Authorization", "Bearer " + token);
      }
      headers.forEach(c::setRequestProperty);
      if (body != null) {
        c.setDoOutput(true);
        c.setRequestProperty("Content-Type", contentType);
        c.setFixedLengthStreamingMode(body.length);
        try (OutputStream out = c.getOutputStream()) {
          out.write(body);
        }
        bytesUp += body.length;
      }
      int status = c.getResponseCode();
      byte[] payload = read(status >= 400 ? c.getErrorStream() : c.getInputStream());
      bytesDown += payload.length;
      return new Response(status, payload, c.getHeaderFields());
    } finally {
      c.disconnect();
    }
  }

  private byte[] read(InputStream in) throws IOException {
    if (in == null) {
      return new byte[0];
    }
    try (in) {
      ByteArrayOutputStream out = new ByteArrayOutputStream();
      byte[] buf = new byte[1 << 16];
      for (int n; (n = in.read(buf)) > 0; ) {
        if (out.size() + n > maxBodyBytes) {
          throw new BadAnswerException("body exceeds " + maxBodyBytes + " bytes");
        }
        out.write(buf, 0, n);
      }
      return out.toByteArray();
    }
  }

  /** base * 2^(attempt-1), capped, times a jitter factor in [0.5, 1). */
  double backoff(int attempt) {
    double d = Math.min(maxDelayS, baseDelayS * Math.pow(2, attempt - 1));
    return d * (0.5 + 0.5 * jitter.nextDouble());
  }

  /** Retry-After as delta-seconds or an HTTP date (RFC 9110 section 10.2.3); null if absent or unreadable. */
  static Double retryAfter(String value) {
    if (value == null) {
      return null;
    }
    String v = value.trim();
    if (v.matches("\\d{1,9}")) {
      return Double.valueOf(v);
    }
    try {
      ZonedDateTime when = ZonedDateTime.parse(v, DateTimeFormatter.RFC_1123_DATE_TIME);
      return Math.max(0.0, Duration.between(ZonedDateTime.now(when.getZone()), when).toMillis() / 1000.0);
    } catch (DateTimeParseException e) {
      return null;
    }
  }

  void pause(double seconds) throws IOException {
    try {
      sleeper.sleep(seconds);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new InterruptedIOException("interrupted while backing off");
    }
  }

  /** {@code {"error", "message"}} from the server, or the raw text when the body is not that. */
  static ServerException serverError(Response r) {
    try {
      JSONObject o = Answers.object(r.body());
      return new ServerException(r.status(), o.optString("error", "http"), o.optString("message", ""));
    } catch (BadAnswerException e) {
      String text = new String(r.body(), java.nio.charset.StandardCharsets.UTF_8);
      return new ServerException(r.status(), "http", text.substring(0, Math.min(200, text.length())));
    }
  }
}
