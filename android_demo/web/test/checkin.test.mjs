// The web phone's check-in (src/phone/api.js Api.checkin) against scripted answers: asking for
// the model inside a "train" answer (FORMAT.md section 9), taking it when it comes, JSON
// otherwise, and refusing a model message that does not carry its own train task. The browser
// test (tests/test_webphone.py) runs the whole phone against the real server.

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { Api, decodeModel } from "../src/phone/api.js";
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

/** Every fetch answers from `replies` in turn (the last one repeats) and is recorded in `sent`. */
function serve(...replies) {
  sent = [];
  globalThis.fetch = async (url, init) => {
    sent.push({ url, ...init });
    const [body, type] = replies.length > 1 ? replies.shift() : replies[0];
    return new Response(body, { status: 200, headers: { "Content-Type": type } });
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
