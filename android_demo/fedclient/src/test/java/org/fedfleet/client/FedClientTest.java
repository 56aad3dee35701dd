package org.fedfleet.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.fedfleet.codec.NonFiniteUpdateException;
import org.fedfleet.wire.Json;
import org.fedfleet.wire.Message;
import org.fedfleet.wire.Tensor;
import org.fedfleet.wire.WireFormat;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/**
 * The client against a scripted server: retries, ETags, inline models, check-ins chained to
 * uploads, refusals, bundle hashes, the NaN guard.
 */
class FedClientTest {
  private static final String PARAMS = "[{\"name\":\"fc1.weight\",\"shape\":[8,64],\"dtype\":\"float32\"},"
      + "{\"name\":\"fc1.bias\",\"shape\":[8],\"dtype\":\"float32\"},"
      + "{\"name\":\"fc2.weight\",\"shape\":[10,8],\"dtype\":\"float32\"},"
      + "{\"name\":\"fc2.bias\",\"shape\":[10],\"dtype\":\"float32\"}]";
  private static final String PLAN = "{\"local_epochs\":1,\"batch_size\":8,\"lr\":0.1,\"prox_mu\":0.0,"
      + "\"codec\":{\"sparsify\":\"topk\",\"density\":0.1,\"quant_bits\":8,\"error_feedback\":true}}";
  private static final String TASK = "{\"format_version\":1,\"mode\":\"sync\",\"model\":\"mlp\",\"input_shape\":[1,8,8],"
      + "\"num_classes\":10,\"params\":" + PARAMS + ",\"train\":" + PLAN + ",\"dp_delta\":1e-05,"
      + "\"max_update_bytes\":16777216,\"rounds\":3}";
  private static final String TRAIN_ANSWER =
      "{\"action\":\"train\",\"round\":2,\"version\":3,\"deadline_s\":59.5,\"train\":" + PLAN + "}";
  private static final FakeServer.Reply TRAIN = FakeServer.Reply.json(200, TRAIN_ANSWER);
  private static final String ACK = "{\"accepted\":true,\"duplicate\":false,\"round\":2,\"version\":3}";
  private static final FakeServer.Reply ACCEPTED = FakeServer.Reply.json(200, ACK);

  private FakeServer server;
  private final List<Double> sleeps = new ArrayList<>();

  @BeforeEach
  void start() throws Exception {
    server = new FakeServer();
    server.on("/v1/register", FakeServer.Reply.json(201, "{\"phone_id\":\"j\",\"token\":\"tok\",\"task\":" + TASK + "}"))
        .on("/v1/checkin", TRAIN)
        .on("/v1/model", model(3))
        .on("/v1/update", ACCEPTED);
  }

  @AfterEach
  void stop() {
    server.close();
  }

  static FakeServer.Reply model(int version) {
    Map<String, Tensor> p = MlpTrainerTest.mlp(64, 8, 10, version);
    byte[] body = WireFormat.encodeDense("model", Map.of("version", version, "model", "mlp"), p.values());
    return new FakeServer.Reply(200, body, Map.of("ETag", "\"v" + version + "\""));
  }

  /**
   * A check-in answer carrying the model (FORMAT.md section 9): the model message of {@code version}
   * whose meta also holds {@code task}, sent as application/octet-stream.
   */
  static FakeServer.Reply inline(int version, String task) throws Exception {
    Map<String, Tensor> p = MlpTrainerTest.mlp(64, 8, 10, version);
    byte[] body = WireFormat.encodeDense("model", Map.of("version", version, "model", "mlp", "task", Json.parse(task)),
        p.values());
    return new FakeServer.Reply(200, body, Map.of("Content-Type", "application/octet-stream",
        "X-Fedfleet-Version", "" + version));
  }

  /**
   * An upload's answer that carries the next check-in's (FORMAT.md section 9, "The next check-in
   * with the upload"): {@code checkin}'s body and type, X-Fedfleet-Checkin: 1 and the upload's own
   * answer {@code ack} in X-Fedfleet-Update.
   */
  static FakeServer.Reply chained(FakeServer.Reply checkin, String ack) {
    Map<String, String> headers = new java.util.HashMap<>(checkin.headers());
    headers.put("X-Fedfleet-Checkin", "1");
    headers.put("X-Fedfleet-Update", ack);
    return new FakeServer.Reply(200, checkin.body(), headers);
  }

  private Http http() {
    return new Http(server.uri(), sleeps::add, new Random(0));
  }

  private FedClient client(Trainer trainer) throws Exception {
    FedClient c = new FedClient(http(), "java-test", trainer, new Random(1), new Random(2));
    c.register();
    return c;
  }

  private static Trainer digits() throws Exception {
    return new MlpTrainer(Digits.bundled().take(32));
  }

  @Test
  void participatesAndRevalidatesTheModelWithItsETag() throws Exception {
    FedClient c = client(digits());
    assertTrue(c.participate(c.checkin()));
    server.on("/v1/model", new FakeServer.Reply(304, new byte[0], Map.of("ETag", "\"v3\"")));
    assertTrue(c.participate(c.checkin()));

    List<FakeServer.Request> models = server.requestsTo("/v1/model");
    assertNull(models.get(0).headers().get("if-none-match"));
    assertEquals("\"v3\"", models.get(1).headers().get("if-none-match"));
    assertEquals("Bearer tok", models.get(1).headers().get("authorization"));
    List<FakeServer.Request> ups = server.requestsTo("/v1/update");
    assertEquals(2, ups.size());
    Message m = WireFormat.decode(ups.get(0).body(), c.task().params(), 0);
    assertEquals("update", m.kind());
    assertEquals(Map.of("update_id", "java-test-1", "base_version", 3L, "num_examples", 32L, "round", 2L,
        "train_loss", m.meta().get("train_loss")), m.meta());
    assertEquals("sparse", m.encodings().get("fc1.weight")); // the task's codec was used
    PhoneStats s = c.stats();
    assertEquals(2, s.participations);
    assertEquals(ups.get(0).body().length + ups.get(1).body().length + countJsonUp(), s.bytesUp);
    assertTrue(s.bytesDown > 4 * (8 * 64 + 8 + 80 + 10), "the first download was counted");
  }

  private long countJsonUp() {
    return server.requests.stream().filter(r -> !r.path().equals("/v1/update")).mapToLong(r -> r.body().length).sum();
  }

  @Test
  void anInlineModelIsTrainedOnWithoutADownload() throws Exception {
    server.on("/v1/checkin", inline(3, TRAIN_ANSWER));
    FedClient c = client(digits());
    Checkin work = c.checkin();
    assertEquals("{\"inline_model\":true}",
        new String(server.requestsTo("/v1/checkin").get(0).body(), StandardCharsets.UTF_8));
    assertEquals("application/json", server.requestsTo("/v1/checkin").get(0).headers().get("content-type"));
    assertEquals(List.of("train", 2, 3, 59.5), List.of(work.action(), work.round(), work.version(), work.deadlineS()));
    assertEquals(8, work.train().batchSize());
    assertEquals(3L, work.model().meta().get("version"));
    assertTrue(c.participate(work));
    assertEquals(0, server.requestsTo("/v1/model").size(), "the model came with the check-in");
    Message up = WireFormat.decode(server.requestsTo("/v1/update").get(0).body(), c.task().params(), 0);
    assertEquals(3L, up.meta().get("base_version"));
    assertEquals(2L, up.meta().get("round"));
    PhoneStats s = c.stats();
    assertEquals(List.of(1, 0, 1, 3), List.of(s.participations, s.modelDownloads, s.inlineModels, s.lastVersion));
    assertTrue(s.bytesDown > 4 * (8 * 64 + 8 + 80 + 10), "the inline model's bytes were counted");
    assertTrue(s.toJson().contains("\"inline_models\":1") && s.toJson().contains("\"model_downloads\":0"), s.toJson());

    // The inline model is the cached copy: a later JSON task revalidates it with its ETag (304 = free).
    server.on("/v1/checkin", TRAIN).on("/v1/model", new FakeServer.Reply(304, new byte[0], Map.of("ETag", "\"v3\"")));
    assertTrue(c.participate(c.checkin()));
    List<FakeServer.Request> models = server.requestsTo("/v1/model");
    assertEquals(1, models.size());
    assertEquals("\"v3\"", models.get(0).headers().get("if-none-match"));
    assertEquals(List.of(2, 1, 1), List.of(c.stats().participations, c.stats().modelDownloads, c.stats().inlineModels));
  }

  @Test
  void aJsonTrainAnswerStillDownloadsAndAskingIsAnOption() throws Exception {
    FedClient c = client(digits()); // asks for the model inline; the server answers JSON (e.g. over its limit)
    assertTrue(c.participate(c.checkin()));
    assertEquals(1, server.requestsTo("/v1/model").size());
    assertEquals(List.of(1, 0), List.of(c.stats().modelDownloads, c.stats().inlineModels));

    FedClient plain = client(digits()).inlineModel(false);
    assertFalse(plain.inlineModel());
    assertTrue(plain.participate(plain.checkin()));
    List<FakeServer.Request> checkins = server.requestsTo("/v1/checkin");
    assertEquals("{\"inline_model\":true}", new String(checkins.get(0).body(), StandardCharsets.UTF_8));
    assertEquals("{}", new String(checkins.get(1).body(), StandardCharsets.UTF_8));
    assertEquals(2, server.requestsTo("/v1/model").size());
    // A phone that did not ask takes no model message for a check-in answer.
    server.on("/v1/checkin", inline(3, TRAIN_ANSWER));
    assertThrows(BadAnswerException.class, plain::checkin);
  }

  @Test
  void aBadInlineModelIsRefused() throws Exception {
    FedClient c = client(digits());
    String waitTask = "{\"action\":\"wait\",\"retry_after_s\":1.0,\"version\":3}";
    String otherVersion = TRAIN_ANSWER.replace("\"version\":3", "\"version\":2");
    String badPlan = TRAIN_ANSWER.replace("\"local_epochs\":1", "\"local_epochs\":\"1\"");
    Map<String, Tensor> p = MlpTrainerTest.mlp(64, 8, 10, 3);
    Map<String, String> octets = Map.of("Content-Type", "application/octet-stream");
    List<FakeServer.Reply> bad = List.of(
        new FakeServer.Reply(200, WireFormat.encodeDense("model", Map.of("version", 3), p.values()), octets), // no task
        new FakeServer.Reply(200, WireFormat.encodeDense("model", Map.of("version", 3, "task", "train"), p.values()),
            octets),
        inline(3, waitTask), inline(3, otherVersion), inline(3, badPlan),
        new FakeServer.Reply(200, WireFormat.encodeDense("update", Map.of("version", 3, "task", Json.parse(TRAIN_ANSWER)),
            p.values()), octets), // not a model message
        new FakeServer.Reply(200, WireFormat.encodeDense("model", Map.of("version", "3", "task",
            Json.parse(TRAIN_ANSWER)), p.values()), octets), // meta.version not an integer
        new FakeServer.Reply(200, WireFormat.encodeDense("model", Map.of("version", 3, "task", Json.parse(TRAIN_ANSWER)),
            List.of(Tensor.ofFloats("fc1.weight", new int[] {2}, new float[2]))), octets), // not the task's tensors
        new FakeServer.Reply(200, "FFLTgarbage".getBytes(StandardCharsets.UTF_8), octets));
    for (FakeServer.Reply reply : bad) {
      server.on("/v1/checkin", reply);
      BadAnswerException e = assertThrows(BadAnswerException.class, c::step);
      assertTrue(e.getMessage().startsWith("unusable answer from the server"), e.getMessage());
    }
    assertEquals(0, server.requestsTo("/v1/update").size());
    assertEquals(0, server.requestsTo("/v1/model").size());
    assertEquals(0, c.stats().inlineModels);
  }

  @Test
  void theNextCheckInComesWithTheUpload() throws Exception {
    String next = TRAIN_ANSWER.replace("\"version\":3", "\"version\":4").replace("\"round\":2", "\"round\":3");
    server.on("/v1/checkin", inline(3, TRAIN_ANSWER))
        .on("/v1/update", chained(inline(4, next), ACK),
            chained(FakeServer.Reply.json(200, "{\"action\":\"wait\",\"retry_after_s\":0.25}"), ACK),
            chained(FakeServer.Reply.json(200, "{\"action\":\"done\",\"version\":5}"),
                ACK.replace("\"duplicate\":false", "\"duplicate\":true")));
    FedClient c = client(digits());
    assertTrue(c.chainCheckin());
    assertEquals("train", c.step()); // POST /v1/checkin, then the upload brings round 3's task
    assertEquals(1, server.requestsTo("/v1/checkin").size());
    assertEquals("train", c.step()); // that task, without a check-in of its own; its upload brings "wait"
    assertEquals(1, server.requestsTo("/v1/checkin").size(), "the second task came with the first upload");
    List<FakeServer.Request> ups = server.requestsTo("/v1/update");
    assertEquals(List.of("checkin=inline", "checkin=inline"), ups.stream().map(FakeServer.Request::query).toList());
    Message second = WireFormat.decode(ups.get(1).body(), c.task().params(), 0);
    assertEquals(List.of(4L, 3L), List.of(second.meta().get("base_version"), second.meta().get("round")));
    assertEquals("wait", c.step());
    assertEquals(List.of(0.25), sleeps);
    // The wait was acted on; now a check-in of its own, whose task's upload brings "done".
    server.on("/v1/checkin", TRAIN).on("/v1/model", model(3));
    PhoneStats s = c.run(0);
    assertEquals(2, server.requestsTo("/v1/checkin").size());
    assertEquals(List.of(3, 0, 0, 3), List.of(s.participations, s.rejected, s.errors, s.lastVersion));
    assertEquals(List.of(5, 3, 2, 1), List.of(s.checkins, s.chainedCheckins, s.inlineModels, s.modelDownloads));
    assertTrue(s.toJson().contains("\"checkins\":5") && s.toJson().contains("\"chained_checkins\":3"), s.toJson());
  }

  @Test
  void withoutItsHeaderAnUploadIsAnsweredAloneAndChainingIsAnOption() throws Exception {
    FedClient c = client(digits()); // asks; this server answers the upload alone (e.g. the phone must rest)
    assertTrue(c.participate(c.checkin()));
    assertTrue(c.participate(c.checkin()));
    assertEquals(2, server.requestsTo("/v1/checkin").size());
    assertEquals(List.of(2, 0), List.of(c.stats().checkins, c.stats().chainedCheckins));

    // Not asking for inline models: the check-in that comes with the upload is asked for as JSON.
    FedClient json = client(digits()).inlineModel(false);
    server.on("/v1/update", chained(TRAIN, ACK));
    assertTrue(json.participate(json.checkin()));
    assertEquals("checkin=json", server.requestsTo("/v1/update").get(2).query());
    assertEquals(3, server.requestsTo("/v1/checkin").size());
    assertEquals("train", json.checkin().action());
    assertEquals(3, server.requestsTo("/v1/checkin").size());

    // Off: nothing is asked, and a header the phone did not ask for is not taken for a check-in.
    FedClient plain = client(digits()).chainCheckin(false);
    assertFalse(plain.chainCheckin());
    server.on("/v1/update", chained(ACCEPTED, ACK));
    assertTrue(plain.participate(plain.checkin()));
    assertNull(server.requestsTo("/v1/update").get(3).query());
    plain.checkin();
    assertEquals(5, server.requestsTo("/v1/checkin").size());
    assertEquals(List.of(2, 0), List.of(plain.stats().checkins, plain.stats().chainedCheckins));
  }

  @Test
  void anUnusableChainedCheckInKeepsTheAcceptedUpload() throws Exception {
    FedClient c = client(digits());
    Map<String, String> octets = Map.of("Content-Type", "application/octet-stream");
    Map<String, Tensor> p = MlpTrainerTest.mlp(64, 8, 10, 4);
    List<FakeServer.Reply> bad = List.of(
        new FakeServer.Reply(200, "FFLTgarbage".getBytes(StandardCharsets.UTF_8), octets),
        new FakeServer.Reply(200, WireFormat.encodeDense("model", Map.of("version", 4), p.values()), octets), // no task
        inline(4, TRAIN_ANSWER), // a task of another version than its model
        FakeServer.Reply.json(200, "<html>busy</html>"),
        FakeServer.Reply.json(200, "{\"action\":\"dance\"}"));
    int checkins = 0;
    for (FakeServer.Reply reply : bad) {
      server.on("/v1/update", chained(reply, ACK));
      assertTrue(c.participate(c.checkin()), "the upload was accepted");
      checkins++;
      assertEquals(checkins, server.requestsTo("/v1/checkin").size(), "each task needed its own check-in");
    }
    PhoneStats s = c.stats();
    assertEquals(List.of(5, 0, 0, 5, 0), List.of(s.participations, s.rejected, s.errors, s.checkins, s.chainedCheckins));
    assertEquals(0, s.inlineModels);

    // Without its own answer, the upload's fate is unknown: that is an unusable answer, not an acceptance.
    server.on("/v1/update", new FakeServer.Reply(200, "{\"action\":\"done\"}".getBytes(StandardCharsets.UTF_8),
        Map.of("Content-Type", "application/json", "X-Fedfleet-Checkin", "1")));
    BadAnswerException e = assertThrows(BadAnswerException.class, () -> c.participate(c.checkin()));
    assertTrue(e.getMessage().contains("X-Fedfleet-Update"), e.getMessage());
    assertEquals(5, c.stats().participations);
  }

  @Test
  void mainTakesTheSwitches() {
    Main.Args a = Main.Args.parse(new String[] {"--server", "http://x", "--chain-checkin", "no"});
    assertEquals(List.of(false, true), List.of(a.chainCheckin, a.inlineModel));
    assertTrue(Main.Args.parse(new String[] {"--server", "http://x"}).chainCheckin);
    assertThrows(IllegalArgumentException.class, () -> Main.Args.parse(new String[] {"--server", "x", "--chain-checkin", "1"}));
  }

  @Test
  void resumesWithAKeptToken() throws Exception {
    server.on("/v1/task", FakeServer.Reply.json(200, TASK));
    FedClient first = client(digits());
    FedClient again = new FedClient(http(), "java-test", digits(), new Random(1), new Random(2));
    assertEquals(first.task().params().keySet(), again.resume(first.token()).params().keySet());
    assertTrue(again.participate(again.checkin()));
    assertEquals("Bearer tok", server.requestsTo("/v1/update").get(0).headers().get("authorization"));
    assertEquals(1, server.requestsTo("/v1/register").size());
  }

  @Test
  void retriesAfter429And503HonouringRetryAfter() throws Exception {
    server.on("/v1/update", new FakeServer.Reply(429, "{}".getBytes(StandardCharsets.UTF_8), Map.of("Retry-After", "7")),
        FakeServer.Reply.json(503, "{\"error\":\"busy\",\"message\":\"later\"}"), ACCEPTED);
    FedClient c = client(digits());
    assertTrue(c.participate(c.checkin()));
    List<FakeServer.Request> ups = server.requestsTo("/v1/update");
    assertEquals(3, ups.size());
    assertArrayEquals(ups.get(0).body(), ups.get(2).body()); // same update_id: the server deduplicates
    assertEquals(7.0, sleeps.get(0));
    assertTrue(sleeps.get(1) >= 0.5 && sleeps.get(1) < 1.0, "backoff " + sleeps.get(1)); // 0.5 s with jitter
    assertEquals(1, c.stats().participations);
  }

  @Test
  void givesUpAfterTheLastAttempt() throws Exception {
    server.on("/v1/update", FakeServer.Reply.json(503, "{\"error\":\"overloaded\",\"message\":\"shed\"}"));
    FedClient c = client(digits());
    ServerException e = assertThrows(ServerException.class, () -> c.participate(c.checkin()));
    assertEquals(503, e.status);
    assertEquals("overloaded", e.reason);
    assertEquals(6, server.requestsTo("/v1/update").size());
    assertEquals(5, sleeps.size());
    for (int i = 0; i < 5; i++) { // exponential: 0.5, 1, 2, 4, 8 s, each times a jitter in [0.5, 1)
      double base = 0.5 * Math.pow(2, i);
      assertTrue(sleeps.get(i) >= base / 2 && sleeps.get(i) < base, sleeps.toString());
    }
  }

  @Test
  void retryAfterAcceptsSecondsAndHttpDates() {
    assertEquals(120.0, Http.retryAfter("120"));
    assertEquals(0.0, Http.retryAfter("Wed, 21 Oct 2015 07:28:00 GMT")); // in the past: now
    String soon = java.time.format.DateTimeFormatter.RFC_1123_DATE_TIME.format(
        java.time.ZonedDateTime.now(java.time.ZoneOffset.UTC).plusSeconds(30));
    double d = Http.retryAfter(soon);
    assertTrue(d > 25 && d <= 30, "" + d);
    assertNull(Http.retryAfter("soon"));
  }

  @Test
  void aStragglersRejectionIsCountedNotThrown() throws Exception {
    server.on("/v1/update", FakeServer.Reply.json(409, "{\"error\":\"stale\",\"message\":\"check in again\"}"));
    FedClient c = client(digits());
    assertFalse(c.participate(c.checkin()));
    assertEquals(1, c.stats().rejected);
    assertEquals(0, c.stats().participations);
  }

  @Test
  void unusableAnswersAreRefusedWithAClearError() throws Exception {
    FedClient c = client(digits());
    for (String bad : List.of("<html>busy</html>", "[1,2]", "{\"action\":\"dance\"}",
        "{\"action\":\"train\",\"round\":\"2\",\"version\":3,\"train\":" + PLAN + "}",
        "{\"action\":\"train\",\"round\":2,\"version\":3,\"train\":{\"local_epochs\":0,\"batch_size\":8,\"lr\":0.1}}",
        "{\"action\":\"train\",\"round\":2,\"version\":3,\"train\":{\"local_epochs\":1,\"batch_size\":8,\"lr\":0.1,"
            + "\"codec\":{\"quant_bits\":3}}}")) {
      server.on("/v1/checkin", FakeServer.Reply.json(200, bad));
      BadAnswerException e = assertThrows(BadAnswerException.class, c::step, bad);
      assertTrue(e.getMessage().startsWith("unusable answer from the server"), e.getMessage());
    }
    server.on("/v1/checkin", TRAIN).on("/v1/model", new FakeServer.Reply(200, "FFLTgarbage".getBytes(StandardCharsets.UTF_8), Map.of()));
    BadAnswerException e = assertThrows(BadAnswerException.class, c::step);
    assertTrue(e.getMessage().contains("(malformed)") || e.getMessage().contains("(checksum)"), e.getMessage());
    server.on("/v1/model", model(3).status() == 200 ? wrongShapeModel() : null);
    e = assertThrows(BadAnswerException.class, c::step);
    assertTrue(e.getMessage().contains("(shape_mismatch)"), e.getMessage());
    assertEquals(0, server.requestsTo("/v1/update").size());
  }

  private static FakeServer.Reply wrongShapeModel() {
    byte[] body = WireFormat.encodeDense("model", Map.of("version", 3),
        List.of(Tensor.ofFloats("fc1.weight", new int[] {2}, new float[2])));
    return new FakeServer.Reply(200, body, Map.of());
  }

  @Test
  void aNonFiniteUpdateIsNeverUploaded() throws Exception {
    Trainer diverging = new Trainer() {
      @Override
      public String runtime() {
        return "test";
      }

      @Override
      public int numExamples() {
        return 5;
      }

      @Override
      public Result train(Map<String, Tensor> params, TrainPlan plan, Random rng) {
        Map<String, float[]> out = new java.util.LinkedHashMap<>();
        params.forEach((n, t) -> out.put(n, t.floats()));
        out.get("fc2.bias")[3] = Float.NaN;
        return new Result(out, Double.NaN, 5, 1);
      }
    };
    FedClient c = client(diverging);
    assertThrows(NonFiniteUpdateException.class, () -> c.participate(c.checkin()));
    assertEquals(0, server.requestsTo("/v1/update").size());
    assertEquals(1, c.stats().refused);
  }

  @Test
  void runStopsWhenDoneAndOnAnAuthenticationError() throws Exception {
    server.on("/v1/checkin", FakeServer.Reply.json(200, "{\"action\":\"wait\",\"retry_after_s\":0.25}"), TRAIN,
        FakeServer.Reply.json(200, "{\"action\":\"done\",\"version\":4}"));
    FedClient c = client(digits());
    PhoneStats s = c.run(3);
    assertEquals(1, s.participations);
    assertEquals(0.25, sleeps.get(0));
    assertTrue(s.toJson().contains("\"participations\":1"), s.toJson());

    server.on("/v1/checkin", FakeServer.Reply.json(401, "{\"error\":\"unknown_phone\",\"message\":\"who?\"}"));
    ServerException e = assertThrows(ServerException.class, () -> c.run(10));
    assertEquals(401, e.status);
  }

  @Test
  void bundleFilesAreCheckedAgainstTheManifest() throws Exception {
    byte[] pte = "pretend ExecuTorch program".getBytes(StandardCharsets.UTF_8);
    String manifest = "{\"format_version\":1,\"model\":\"mlp\",\"artifacts\":{"
        + "\"model.pte\":{\"available\":true,\"sha256\":\"" + BundleFiles.sha256(pte) + "\",\"size\":" + pte.length + "},"
        + "\"model.onnx\":{\"available\":false,\"op\":\"aten::foo\",\"reason\":\"not exportable\"}}}";
    server.on("/v1/bundle/manifest.json", FakeServer.Reply.json(200, manifest))
        .on("/v1/bundle/model.pte", new FakeServer.Reply(200, pte, Map.of()));
    FedClient c = client(digits());
    assertArrayEquals(pte, c.downloadBundleFile("model.pte"));

    byte[] tampered = pte.clone();
    tampered[0] ^= 1;
    server.on("/v1/bundle/model.pte", new FakeServer.Reply(200, tampered, Map.of()));
    assertTrue(assertThrows(BundleException.class, () -> c.downloadBundleFile("model.pte")).getMessage().contains("sha256"));
    assertTrue(assertThrows(BundleException.class, () -> c.downloadBundleFile("model.onnx")).getMessage()
        .contains("not exportable"));
    assertThrows(BundleException.class, () -> c.downloadBundleFile("train_step.onnx"));
  }
}
