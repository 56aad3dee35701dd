// The web phone's check-in (src/phone/api.js Api.checkin) against scripted answers: asking for
// the model inside a "train" answer (FORMAT.md section 9), taking it when it comes, JSON
// otherwise, and refusing a model message that does not carry its own train task. Then the
// check-in that comes with an upload (Api.update, Outbox.send; same section): taken when the
// server says it made one, the upload's answer alone otherwise, and an unusable one dropped
// without losing the accepted upload. The browser test (tests/test_webphone.py) runs the whole
// phone against the real server.

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { Api, ServerError, decodeModel } from "../src/phone/api.js";
import { Outbox } from "../src/phone/outbox.js";
import { parseJson } from "../src/wire/canonical.js";
import { encodeMessage } from "../src/wire/wire.js";

const PARAMS = [
  { name: "fc.weight", shape: [3, 4], dtype: "float32" },
  { name: "fc.bias", shape: [3], dtype: "float32" },
];
const TASK = '{"action":"train","round":2,"version":3,"deadline_s":59.5,"train":{"local_epochs":1,'
  + '"batch_size":8,"lr":0.1,"prox_mu":0.0,"codec":{"sparsify":"topk","density":0.1}}}';
const realFetch = globalThis.fetch;
let sent = [];

/**
 * Every fetch answers from `replies` in turn (the last one repeats) and is recorded in `sent`;
 * a reply is [body, Content-Type, { status, headers }] (status 200 and no other header by default).
 */
function serve(...replies) {
  sent = [];
  globalThis.fetch = async (url, init) => {
    sent.push({ url, ...init });
    const [body, type, { status = 200, headers = {} } = {}] = replies.length > 1 ? replies.shift() : replies[0];
    return new Response(body, { status, headers: { "Content-Type": type, ...headers } });
  };
}

afterEach(() => {
  globalThis.fetch = realFetch;
});

function model(meta, { kind = "model", params = PARAMS } = {}) {
  const tensors = params.map(({ name, shape, dtype }) => ({
    name, shape, dtype, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => i / 8),
  }));
  return encodeMessage(kind, meta, tensors);
}

const octets = (body) => [body, "application/octet-stream"];
const json = (text) => [text, "application/json; charset=utf-8"];
const api = () => Object.assign(new Api("http://fedfleet.test"), { token: "tok" });

test("an inline model comes back with its task, checked against the task's tensors", async () => {
  const body = await model({ version: 3, model: "mlp", task: parseJson(TASK) });
  serve(octets(body));
  const a = api();
  const { answer, model: m, body: kept } = await a.checkin({ inlineModel: true, params: PARAMS });
  assert.equal(sent.length, 1);
  assert.equal(sent[0].url, "http://fedfleet.test/v1/checkin");
  assert.equal(new TextDecoder().decode(sent[0].body), '{"inline_model":true}');
  assert.equal(sent[0].headers.Authorization, "Bearer tok");
  assert.deepEqual(answer, JSON.parse(TASK));
  assert.equal(m.version, 3);
  assert.deepEqual([...m.params.keys()], ["fc.weight", "fc.bias"]);
  assert.equal(m.params.get("fc.bias")[2], 0.25);
  assert.deepEqual(kept, body); // the bytes the phone keeps as its offline copy of GET /v1/model
  assert.equal(a.bytesDown, body.length);
});

test("JSON answers stay JSON, and a phone that did not ask takes no model message", async () => {
  serve(json('{"action":"wait","retry_after_s":0.5,"version":3}'), json(TASK));
  const a = api();
  assert.deepEqual(await a.checkin({ inlineModel: true, params: PARAMS }),
    { answer: { action: "wait", retry_after_s: 0.5, version: 3 }, model: null, body: null });
  const train = await a.checkin({ inlineModel: true, params: PARAMS }); // e.g. a model over the server's limit
  assert.deepEqual(train, { answer: JSON.parse(TASK), model: null, body: null });

  serve(octets(await model({ version: 3, task: parseJson(TASK) })));
  await assert.rejects(a.checkin({ params: PARAMS }), SyntaxError);
  assert.equal(new TextDecoder().decode(sent[0].body), "{}");
});

test("a model message that does not carry its own train task is refused", async () => {
  const other = TASK.replace('"version":3', '"version":2');
  const noTask = /must carry the train task for its version/;
  const notModel = /must be of kind 'model' with an integer meta.version/;
  const cases = {
    "no task": [await model({ version: 3 }), noTask],
    "task not an object": [await model({ version: 3, task: "train" }), noTask],
    "a wait answer": [await model({ version: 3, task: { action: "wait", retry_after_s: 1, version: 3 } }), noTask],
    "another version's task": [await model({ version: 3, task: parseJson(other) }), noTask],
    "not a model message": [await model({ version: 3, task: parseJson(TASK) }, { kind: "update" }), notModel],
    "meta.version not an integer": [await model({ version: "3", task: parseJson(TASK) }), notModel],
    "not the task's tensors": [await model({ version: 3, task: parseJson(TASK) }, { params: PARAMS.slice(1) }),
      /tensor names differ/],
    "not a wire message": [new TextEncoder().encode("FFLTgarbage, not a model"), /format version/],
  };
  for (const [what, [body, why]] of Object.entries(cases)) {
    serve(octets(body));
    await assert.rejects(api().checkin({ inlineModel: true, params: PARAMS }), why, what);
  }
  assert.throws(() => decodeModel(cases["not a model message"][0], PARAMS), notModel); // downloads are checked alike
});

const ACK = '{"accepted":true,"duplicate":false,"round":2,"version":3}';
const chained = ([body, type], ack = ACK) => [body, type, { headers: { "X-Fedfleet-Checkin": "1", "X-Fedfleet-Update": ack } }];
const UPDATE = new Uint8Array([1, 2, 3]); // Api.update does not look inside the update it sends

test("an upload that asks for the next check-in takes it, with the upload's answer from its header", async () => {
  const body = await model({ version: 3, model: "mlp", task: parseJson(TASK) });
  serve(chained(octets(body)));
  const a = api();
  const inline = await a.update(UPDATE, { headers: { "X-Test": "1" }, chain: true, inlineModel: true, params: PARAMS });
  assert.equal(sent[0].url, "http://fedfleet.test/v1/update?checkin=inline");
  assert.deepEqual([sent[0].method, sent[0].body, sent[0].headers["X-Test"]], ["POST", UPDATE, "1"]);
  assert.deepEqual(inline.answer, JSON.parse(ACK));
  assert.equal(inline.nextError, null);
  assert.deepEqual(inline.next.answer, JSON.parse(TASK)); // as Api.checkin would have answered
  assert.equal(inline.next.model.version, 3);
  assert.deepEqual(inline.next.body, body);
  assert.equal(a.bytesDown, body.length);

  // Not asking for the model inline: ?checkin=json, and every chained answer is JSON.
  const dup = '{"accepted":true,"duplicate":true,"round":2,"version":3}';
  serve(chained(json('{"action":"wait","retry_after_s":0.5,"version":4}'), dup));
  const plain = await api().update(UPDATE, { chain: true, params: PARAMS });
  assert.equal(sent[0].url, "http://fedfleet.test/v1/update?checkin=json");
  assert.deepEqual(plain, {
    answer: JSON.parse(dup), next: { answer: { action: "wait", retry_after_s: 0.5, version: 4 }, model: null, body: null },
    nextError: null,
  });
});

test("without X-Fedfleet-Checkin the answer is the upload's alone; off, nothing is asked", async () => {
  serve(json('{"accepted":true,"duplicate":false,"round":2,"version":3,"next_checkin_s":30.0}'));
  const rest = await api().update(UPDATE, { chain: true, inlineModel: true, params: PARAMS });
  assert.equal(sent[0].url, "http://fedfleet.test/v1/update?checkin=inline");
  assert.deepEqual(rest, { answer: { ...JSON.parse(ACK), next_checkin_s: 30.0 }, next: null, nextError: null });

  serve(chained(json(ACK), '{"accepted":false}')); // the header of a phone that did not ask means nothing
  const off = await api().update(UPDATE, { inlineModel: true, params: PARAMS });
  assert.equal(sent[0].url, "http://fedfleet.test/v1/update");
  assert.deepEqual(off, { answer: JSON.parse(ACK), next: null, nextError: null });

  serve([json(TASK)[0], "application/json", { headers: { "X-Fedfleet-Checkin": "1" } }]);
  await assert.rejects(api().update(UPDATE, { chain: true, params: PARAMS }), /X-Fedfleet-Update/);
});

test("an unusable chained check-in is dropped, the accepted upload is not", async () => {
  const cases = {
    "not a wire message": octets(new TextEncoder().encode("FFLTgarbage, not a model")),
    "a model without its task": octets(await model({ version: 3 })),
    "not the task's tensors": octets(await model({ version: 3, task: parseJson(TASK) }, { params: PARAMS.slice(1) })),
    "not JSON": json("<html>busy</html>"),
    "JSON without an action": json("[1,2]"),
  };
  for (const [what, reply] of Object.entries(cases)) {
    serve(chained(reply));
    const { answer, next, nextError } = await api().update(UPDATE, { chain: true, inlineModel: true, params: PARAMS });
    assert.deepEqual(answer, JSON.parse(ACK), what);
    assert.equal(next, null, what);
    assert.ok(nextError instanceof Error, what);
  }
});

test("the outbox asks for the next check-in on every attempt of its update", async () => {
  const kept = new Map();
  const store = { get: async (k) => kept.get(k), set: async (k, v) => kept.set(k, v), delete: async (k) => kept.delete(k) };
  const outbox = new Outbox(api(), store);
  await outbox.put({ body: UPDATE, meta: { update_id: "p-1", base_version: 3 }, before: null, attempts: 0 });
  const busy = ['{"error":"busy","message":"later"}', "application/json", { status: 503 }];
  serve(busy, chained(json('{"action":"done","version":5}')));
  const got = await outbox.send({ phoneId: "p", key: null }, { chain: true, inlineModel: false, params: PARAMS });
  assert.deepEqual(sent.map((r) => r.url), Array(2).fill("http://fedfleet.test/v1/update?checkin=json"));
  assert.equal(sent[1].headers["Content-Type"], "application/octet-stream");
  assert.deepEqual(got.answer, JSON.parse(ACK));
  assert.deepEqual(got.next.answer, { action: "done", version: 5 });
  assert.equal(kept.get("pending").attempts, 1); // still pending: the phone drops it once it has taken the answer

  serve(['{"error":"stale","message":"round closed"}', "application/json", { status: 409 }]);
  await assert.rejects(outbox.send({ phoneId: "p", key: null }, { chain: true }), (err) => err instanceof ServerError && err.status === 409);
});
