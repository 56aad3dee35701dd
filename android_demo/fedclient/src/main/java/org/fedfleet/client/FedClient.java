package org.fedfleet.client;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;
import java.util.Random;
import org.fedfleet.codec.EncoderConfig;
import org.fedfleet.codec.NonFiniteUpdateException;
import org.fedfleet.codec.PrivacyAccountant;
import org.fedfleet.codec.UpdateEncoder;
import org.fedfleet.wire.CanonicalJson;
import org.fedfleet.wire.Message;
import org.fedfleet.wire.Tensor;
import org.fedfleet.wire.WireException;
import org.fedfleet.wire.WireFormat;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The phone's protocol client: register, check in, download (ETag), train, encode, upload. It
 * behaves as {@code device_runtime/protocol_client.py}: one encoder kept across tasks for its
 * error-feedback residual, rolled back when an upload is refused; 409 counts as a straggler's
 * rejection; 400/401 end the run. Everything the server sends is checked before it is used.
 * Check-ins ask for the model inside a "train" answer ({@link #inlineModel(boolean)}, on by
 * default), which saves the download's round trip whenever the server sends it that way; uploads
 * ask for the next check-in ({@link #chainCheckin(boolean)}, on by default), which saves the
 * check-in's request whenever the server makes it with the upload.
 */
public final class FedClient {
  private static final Map<String, String> NO_HEADERS = java.util.Collections.emptyMap();
  private final Http http;
  private final String name;
  private final Trainer trainer;
  private final Random trainRng;
  private final Random codecRng;
  private final PhoneStats stats;
  private final PrivacyAccountant accountant;
  private final BundleFiles bundles;
  private Task task;
  private Message model; // the last model received (downloaded or inline); revalidated with its ETag
  private boolean inlineModel = true;
  private boolean chainCheckin = true;
  private Checkin next; // the next check-in's answer, when it came with the last upload's
  private UpdateEncoder encoder;
  private Map<String, Object> encoderCodec;
  private int updatesSent;
  private String modelFingerprint; // of the bundle this phone runs; sent at registration

  /** {@code codecRng}: noise and stochastic rounding; pass a SecureRandom outside tests. */
  public FedClient(Http http, String name, Trainer trainer, Random trainRng, Random codecRng) {
    this(http, name, trainer, trainRng, codecRng, new PrivacyAccountant());
  }

  /** With the phone's accountant, which an app restores from storage so epsilon survives restarts. */
  public FedClient(Http http, String name, Trainer trainer, Random trainRng, Random codecRng,
                   PrivacyAccountant accountant) {
    this.accountant = accountant;
    this.http = http;
    this.bundles = new BundleFiles(http);
    this.name = name;
    this.trainer = trainer;
    this.trainRng = trainRng;
    this.codecRng = codecRng;
    this.stats = new PhoneStats(name);
    stats.examples = trainer.numExamples();
  }

  /**
   * The model this phone runs, as its bundle's manifest names it ({@link BundleManifest#fingerprint}):
   * sent with {@link #register()}, where the server refuses another model than the task's with 409
   * {@code model_mismatch} (a {@link ServerException}). Without it, the server cannot check.
   */
  public FedClient modelFingerprint(String fingerprint) {
    modelFingerprint = fingerprint;
    return this;
  }

  public Task register() throws IOException {
    JSONObject body = new JSONObject();
    try {
      body.put("name", name).put("platform", "java").put("runtime", trainer.runtime());
      if (modelFingerprint != null) {
        body.put("model_fingerprint", modelFingerprint);
      }
    } catch (JSONException e) {
      throw new IllegalStateException(e);
    }
    JSONObject answer = json("POST", "/v1/register", body, false);
    http.token(Answers.string(answer, "token"));
    task = Task.parse(Answers.child(answer, "task"));
    return task;
  }

  /**
   * Resumes an enrollment made earlier: a phone app keeps its token across restarts (its name
   * is taken on the server, so it cannot register again), and fetches the task anew.
   */
  public Task resume(String token) throws IOException {
    http.token(token);
    next = null;
    task = Task.parse(Answers.object(http.send("GET", "/v1/task", null, null, NO_HEADERS, true).body()));
    return task;
  }

  /** The bearer token from {@link #register()}, for the app to keep. */
  public String token() {
    return http.token();
  }

  /**
   * Whether check-ins send {@code {"inline_model": true}} (FORMAT.md section 9): a "train" answer
   * may then come as the model's wire message with the task in its meta, and {@link
   * #participate(Checkin)} needs no download. On by default; off, every answer is JSON.
   */
  public FedClient inlineModel(boolean on) {
    inlineModel = on;
    return this;
  }

  public boolean inlineModel() {
    return inlineModel;
  }

  /**
   * Whether uploads ask for the phone's next check-in ({@code POST /v1/update?checkin=inline}, or
   * {@code json} without {@link #inlineModel()}; FORMAT.md section 9, "The next check-in with the
   * upload"): the server then answers the upload with that check-in's answer, which the next
   * {@link #checkin()} returns without a request of its own. On by default; turn it off for a phone
   * that may stop before its next check-in (a task it was handed would go undone until its deadline).
   */
  public FedClient chainCheckin(boolean on) {
    chainCheckin = on;
    return this;
  }

  public boolean chainCheckin() {
    return chainCheckin;
  }

  /**
   * The next check-in's answer: the one the last upload brought, if it did, or else POST
   * /v1/checkin. Asking for the model inline, the answer is JSON ({@code wait}, {@code done}, or a
   * task whose model is over the server's inline limit) or, by its Content-Type, a model message
   * carrying the task under {@code meta.task}; that model is checked as a downloaded one is, and
   * must be of the task's version. It comes back as {@link Checkin#model()}.
   */
  public Checkin checkin() throws IOException {
    if (next != null) {
      Checkin c = next;
      next = null;
      stats.checkins++;
      stats.chainedCheckins++;
      return c;
    }
    JSONObject body = new JSONObject();
    if (inlineModel) {
      try {
        body.put("inline_model", true);
      } catch (JSONException e) {
        throw new IllegalStateException(e);
      }
    }
    Http.Response r = http.send("POST", "/v1/checkin", body.toString().getBytes(StandardCharsets.UTF_8),
        "application/json", NO_HEADERS, false);
    Checkin c = checkinAnswer(r);
    stats.checkins++;
    return c;
  }

  /** A check-in's answer: JSON, or (asked for inline, by its Content-Type) the task's model message. */
  private Checkin checkinAnswer(Http.Response r) throws BadAnswerException {
    String type = r.header("Content-Type");
    if (inlineModel && type != null && type.toLowerCase(Locale.ROOT).startsWith("application/octet-stream")) {
      return inlineTask(r.body());
    }
    return Checkin.parse(Answers.object(r.body()));
  }

  /** The task inside an inline model's meta, with that model; the model becomes the ETag-cached copy. */
  private Checkin inlineTask(byte[] body) throws BadAnswerException {
    Message m = decodeModel(body);
    if (!(m.meta().get("task") instanceof Map<?, ?> raw)) {
      throw new BadAnswerException("an inline model's meta must carry the task under 'task'");
    }
    Checkin c;
    try {
      c = Checkin.parse(Answers.object(CanonicalJson.write(raw, false).getBytes(StandardCharsets.UTF_8)));
    } catch (IllegalArgumentException e) {
      throw new BadAnswerException("an inline model's meta.task: " + e.getMessage());
    }
    if (!c.action().equals("train") || c.version() != (Long) m.meta().get("version")) {
      throw new BadAnswerException("an inline model's meta.task must be a train task for its version "
          + m.meta().get("version") + ", got " + c.action() + " for version " + c.version());
    }
    model = m;
    stats.inlineModels++;
    return c.withModel(m);
  }

  /** The current model; a cached copy is revalidated with {@code If-None-Match} (304 = free). */
  public Message downloadModel() throws IOException {
    Map<String, String> headers = new LinkedHashMap<>();
    if (model != null) {
      headers.put("If-None-Match", "\"v" + model.meta().get("version") + "\"");
    }
    Http.Response r = http.send("GET", "/v1/model", null, null, headers, true);
    stats.modelDownloads++;
    if (r.status() == 304 && model != null) {
      return model;
    }
    model = decodeModel(r.body());
    return model;
  }

  /** A model message checked against the task's tensors, of kind "model" with an integer meta.version. */
  private Message decodeModel(byte[] body) throws BadAnswerException {
    try {
      Message m = WireFormat.decode(body, requireTask().params(), 0);
      if (!"model".equals(m.kind()) || !(m.meta().get("version") instanceof Long)) {
        throw new BadAnswerException("the model message must be of kind 'model' with an integer meta.version");
      }
      return m;
    } catch (WireException e) {
      throw new BadAnswerException("model message refused (" + e.reason() + "): " + e.getMessage(), e);
    }
  }

  /**
   * A file of the on-device bundle ({@code GET /v1/bundle/{file}}), returned only when it hashes
   * to the sha256 that {@code manifest.json} lists for it ({@link BundleFiles}).
   */
  public byte[] downloadBundleFile(String file) throws IOException {
    return bundles.download(file);
  }

  /** The bundle's {@code manifest.json} (format_version 1: model, input_shape, max_batch, artifacts, ...). */
  public JSONObject bundleManifest() throws IOException {
    return bundles.manifest();
  }

  public PrivacyAccountant accountant() {
    return accountant;
  }

  /** One check-in and, when handed work, one training task. Returns the action. */
  public String step() throws IOException {
    Checkin c = checkin();
    switch (c.action()) {
      case "wait" -> pause(c.retryAfterS());
      case "train" -> participate(c);
      default -> { }
    }
    return c.action();
  }

  /**
   * Download (unless the model came with the check-in), train, encode, upload. Returns true when
   * the server accepted the update, false when it refused it as a straggler's (409). NaN/Inf
   * after training is never uploaded.
   */
  public boolean participate(Checkin work) throws IOException {
    Message m = work.model() != null ? work.model() : downloadModel();
    int version = ((Long) m.meta().get("version")).intValue();
    stats.lastVersion = version;
    TrainPlan plan = work.train();
    Trainer.Result result = trainer.train(m.tensors(), plan, trainRng);
    Map<String, Tensor> delta = delta(m.tensors(), result.params());
    if (plan.secureAgg()) {
      return secure(work, delta, result);
    }
    UpdateEncoder enc = encoder(plan.codec());
    Integer base = enc.residualBaseVersion();
    Map<String, Object> meta = new LinkedHashMap<>();
    meta.put("update_id", name + "-" + (++updatesSent));
    meta.put("base_version", version);
    meta.put("num_examples", result.numExamples());
    meta.put("train_loss", Double.isFinite(result.loss()) ? (Object) result.loss() : null);
    meta.put("round", work.round());
    byte[] body;
    try {
      body = enc.encode(delta, meta, base == null ? 0 : Math.max(version - base, 0));
    } catch (NonFiniteUpdateException e) {
      stats.refused++;
      throw e;
    }
    if (body.length > requireTask().maxUpdateBytes()) {
      enc.rollback();
      throw new IOException("update of " + body.length + " bytes exceeds the server's max_update_bytes");
    }
    if (enc.release() != null) {
      accountant.charge(enc.release()); // spent once it leaves, whatever happens next
      stats.epsilon = accountant.epsilon(requireTask().dpDelta());
    }
    try {
      String path = chainCheckin ? "/v1/update?checkin=" + (inlineModel ? "inline" : "json") : "/v1/update";
      Http.Response r = http.send("POST", path, body, "application/octet-stream", NO_HEADERS, true);
      boolean chained = chainCheckin && "1".equals(r.header("X-Fedfleet-Checkin"));
      JSONObject answer = Answers.object(chained ? uploadAnswer(r) : r.body());
      if (!answer.optBoolean("accepted", false)) {
        throw new BadAnswerException("upload answer without accepted=true: " + answer);
      }
      if (chained) {
        next = chainedCheckin(r);
      }
    } catch (ServerException e) {
      enc.rollback(); // nothing was merged: keep the residual as it was
      if (e.status == 409) {
        stats.rejected++;
        return false;
      }
      throw e;
    } catch (IOException e) {
      enc.rollback();
      throw e;
    } finally {
      syncBytes();
    }
    stats.participations++;
    stats.lastRound = work.round();
    stats.lastLoss = result.loss();
    return true;
  }

  private boolean secure(Checkin work, Map<String, Tensor> delta, Trainer.Result result) throws IOException {
    try {
      if (!new SecureRound(http, work.round()).run(delta, codecRng)) {
        stats.rejected++;  // the group aborted or closed without this phone: nothing of it merged
        return false;
      }
    } finally {
      syncBytes();
    }
    stats.participations++;
    stats.lastRound = work.round();
    stats.lastLoss = result.loss();
    return true;
  }

  /** The upload's own answer when the server made the next check-in with it: header X-Fedfleet-Update. */
  private static byte[] uploadAnswer(Http.Response r) throws BadAnswerException {
    String ack = r.header("X-Fedfleet-Update");
    if (ack == null) {
      throw new BadAnswerException("an upload answered with a check-in must carry its own answer in X-Fedfleet-Update");
    }
    return ack.getBytes(StandardCharsets.UTF_8);
  }

  /**
   * The check-in that came with an accepted upload, or null when it is unusable: the update was
   * accepted all the same (its residual must not be rolled back), and {@link #checkin()} asks anew.
   */
  private Checkin chainedCheckin(Http.Response r) {
    try {
      return checkinAnswer(r);
    } catch (BadAnswerException e) {
      return null;
    }
  }

  /**
   * Checks in until the server says the task is done. Errors are retried with a backoff of
   * 0.2 s doubling to 10 s; after {@code maxErrors} of them, or at once on 400/401 (this
   * phone's requests are wrong, retrying cannot help), the error is thrown.
   */
  public PhoneStats run(int maxErrors) throws IOException {
    double backoff = 0.2;
    while (true) {
      try {
        if (step().equals("done")) {
          return stats();
        }
        backoff = 0.2;
      } catch (IOException | NonFiniteUpdateException e) {
        stats.errors++;
        boolean fatal = e instanceof ServerException se && (se.status == 400 || se.status == 401);
        if (fatal || stats.errors > maxErrors) {
          throw e;
        }
        pause(backoff);
        backoff = Math.min(backoff * 2, 10.0);
      } finally {
        syncBytes();
      }
    }
  }

  public PhoneStats stats() {
    syncBytes();
    return stats;
  }

  public Task task() {
    return task;
  }

  /** new - old in float32, as the Python runtime computes it. */
  private static Map<String, Tensor> delta(Map<String, Tensor> old, Map<String, float[]> trained) {
    Map<String, Tensor> out = new LinkedHashMap<>();
    for (Map.Entry<String, Tensor> e : old.entrySet()) {
      float[] a = e.getValue().floats();
      float[] b = trained.get(e.getKey());
      if (b == null || b.length != a.length) {
        throw new IllegalStateException("the trainer returned no or a wrong-sized '" + e.getKey() + "'");
      }
      float[] d = new float[a.length];
      for (int i = 0; i < d.length; i++) {
        d[i] = b[i] - a[i];
      }
      out.put(e.getKey(), Tensor.ofFloats(e.getKey(), e.getValue().shape(), d));
    }
    return out;
  }

  /** The encoder the task asks for; kept across tasks (its residual) while the codec is the same. */
  private UpdateEncoder encoder(Map<String, Object> codec) throws BadAnswerException {
    if (encoder == null || !codec.equals(encoderCodec)) {
      try {
        encoder = new UpdateEncoder(EncoderConfig.fromMap(codec), codecRng);
      } catch (IllegalArgumentException e) {
        throw new BadAnswerException("train.codec: " + e.getMessage());
      }
      encoderCodec = codec;
    }
    return encoder;
  }

  private JSONObject json(String method, String path, Object body, boolean wire) throws IOException {
    byte[] bytes = wire ? (byte[]) body : body.toString().getBytes(StandardCharsets.UTF_8);
    String type = wire ? "application/octet-stream" : "application/json";
    Http.Response r = http.send(method, path, bytes, type, NO_HEADERS, wire);
    return Answers.object(r.body());
  }

  private Task requireTask() {
    if (task == null) {
      throw new IllegalStateException("register() first");
    }
    return task;
  }

  private void syncBytes() {
    stats.bytesUp = http.bytesUp();
    stats.bytesDown = http.bytesDown();
  }

  private void pause(double seconds) throws IOException {
    http.pause(seconds);
  }
}
