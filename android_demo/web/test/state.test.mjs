// A model's state on the web phone (FORMAT.md section 11): the update carries it after its own
// tensors as dense "state:<buffer>" entries (float32, int64 counters), whatever the codec does to
// the update; a model message's state is split from its parameters; the bundle's initial state is
// read from weights.safetensors; a task or bundle whose state the phone cannot carry is refused in
// one line. The browser test (tests/test_webphone_bn_state.py) trains such a model against the server.

import assert from "node:assert/strict";
import { test } from "node:test";

import { UpdateEncoder } from "../src/codec/encoder.js";
import { BundleError, checkManifest } from "../src/phone/bundle.js";
import { completeState, fitState, modelTensors, readSafetensors, splitModel, stateList, taskState } from "../src/phone/model_state.js";
import { decodeMessage } from "../src/wire/wire.js";

const rng = { random: () => 0.25 };
const META = { update_id: "p-1", base_version: 0, num_examples: 7, round: 1 };
const PARAMS = [{ name: "bn.weight", shape: [3], dtype: "float32" }];
const STATE = [
  { name: "bn.running_mean", shape: [3], dtype: "float32" },
  { name: "bn.num_batches_tracked", shape: [], dtype: "int64" },
];
const TASK = { params: PARAMS, state: STATE, state_mode: "shared" };

function stateMap() {
  return new Map([["bn.running_mean", Float32Array.of(0.5, -1.25, 3)], ["bn.num_batches_tracked", BigInt64Array.of(12n)]]);
}

test("the update carries the state after its tensors, dense and exact, whatever the codec", async () => {
  const encoder = new UpdateEncoder({ sparsify: "topk", density: 0.5, quant_bits: 8, chunk: 64, clip: 0.1 }, rng);
  const delta = [{ name: "bn.weight", shape: [3], data: Float32Array.of(1, -2, 3) }];
  const body = await encoder.encode(delta, META, { state: stateList(stateMap(), STATE) });
  const message = decodeMessage(body);
  assert.deepEqual([...message.tensors.keys()], ["bn.weight", "state:bn.running_mean", "state:bn.num_batches_tracked"]);
  assert.deepEqual(message.encodings, { "bn.weight": "sparse", "state:bn.running_mean": "dense", "state:bn.num_batches_tracked": "dense" });
  const mean = message.tensors.get("state:bn.running_mean");
  assert.equal(mean.dtype, "float32");
  assert.deepEqual([...mean.data], [0.5, -1.25, 3]); // not clipped to 0.1, not quantized
  const count = message.tensors.get("state:bn.num_batches_tracked");
  assert.equal(count.dtype, "int64");
  assert.deepEqual(count.shape, []);
  assert.deepEqual([...count.data], [12n]);
  assert.ok(Math.hypot(...message.tensors.get("bn.weight").data) <= 0.1 + 1e-6); // the update itself was clipped
});

test("without state the update is what it always was", async () => {
  const delta = [{ name: "bn.weight", shape: [3], data: Float32Array.of(1, -2, 3) }];
  const a = await new UpdateEncoder({}, rng).encode(delta, META);
  const b = await new UpdateEncoder({}, rng).encode(delta, META, { state: [] });
  assert.deepEqual(a, b);
  await assert.rejects(new UpdateEncoder({}, rng).encode(delta, META, {
    state: [{ name: "bn.running_var", shape: [1], data: Float32Array.of(NaN) }] }), /state bn.running_var holds NaN/);
});

test("a model message carries the state in shared mode only, and splits into parameters and state", () => {
  assert.deepEqual(modelTensors(TASK).map((t) => t.name), ["bn.weight", "state:bn.running_mean", "state:bn.num_batches_tracked"]);
  assert.deepEqual(modelTensors({ ...TASK, state_mode: "local" }).map((t) => t.name), ["bn.weight"]);
  assert.deepEqual(modelTensors({ params: PARAMS }).map((t) => t.name), ["bn.weight"]);
  const { params, state } = splitModel(new Map([["bn.weight", Float32Array.of(1, 2, 3)], ...[...stateMap()].map(([n, v]) => [`state:${n}`, v])]));
  assert.deepEqual([...params.keys()], ["bn.weight"]);
  assert.deepEqual([...state.keys()], ["bn.running_mean", "bn.num_batches_tracked"]);
  assert.equal(fitState(state, STATE), state);
  assert.equal(splitModel(new Map([["bn.weight", Float32Array.of(1, 2, 3)]])).state, null);
  assert.equal(fitState(new Map([["bn.running_mean", Float32Array.of(1, 2, 3)]]), STATE), null); // a buffer missing
});

test("a training starts from the given state, and a buffer it lacks from the bundle's", () => {
  const initial = new Map([["bn.running_mean", Float32Array.of(0, 0, 0)], ["bn.num_batches_tracked", BigInt64Array.of(0n)]]);
  const given = stateMap();
  const full = completeState(given, STATE, initial);
  assert.equal(full.get("bn.running_mean"), given.get("bn.running_mean"));
  assert.equal(full.get("bn.num_batches_tracked"), given.get("bn.num_batches_tracked"));
  const partial = completeState(new Map([["bn.running_mean", Float32Array.of(1, 2, 3)]]), STATE, initial);
  assert.deepEqual([...partial.get("bn.running_mean")], [1, 2, 3]);
  assert.equal(partial.get("bn.num_batches_tracked"), initial.get("bn.num_batches_tracked"));
  const odd = new Map([["bn.running_mean", Float32Array.of(1, 2)], ["bn.num_batches_tracked", Float32Array.of(3)]]);
  assert.deepEqual([...completeState(odd, STATE, initial)], [...initial]); // a wrong size or dtype is not taken
  assert.deepEqual([...completeState(null, STATE, initial).keys()], ["bn.running_mean", "bn.num_batches_tracked"]);
});

function safetensors(tensors) {
  const header = {};
  const blobs = [];
  let offset = 0;
  for (const [name, dtype, shape, data] of tensors) {
    const bytes = new Uint8Array(data.buffer.slice(0));
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes.length] };
    blobs.push(bytes);
    offset += bytes.length;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  blobs.reduce((pos, b) => (out.set(b, pos), pos + b.length), 8 + json.length);
  return out;
}

test("the bundle's initial state comes from weights.safetensors", () => {
  const file = safetensors([["bn.weight", "F32", [3], Float32Array.of(9, 9, 9)], ["bn.running_mean", "F32", [3], Float32Array.of(0, 1, 2)],
    ["bn.num_batches_tracked", "I64", [], BigInt64Array.of(0n)]]);
  const got = readSafetensors(file, ["bn.running_mean", "bn.num_batches_tracked"]);
  assert.deepEqual([...got.get("bn.running_mean").data], [0, 1, 2]);
  assert.deepEqual(got.get("bn.num_batches_tracked"), { dtype: "int64", shape: [], data: BigInt64Array.of(0n) });
  assert.throws(() => readSafetensors(file, ["bn.running_var"]), /weights.safetensors: no tensor bn.running_var/);
  const half = safetensors([["bn.running_mean", "F16", [2], Uint16Array.of(0, 0)]]);
  assert.throws(() => readSafetensors(half, ["bn.running_mean"]), /bn.running_mean is F16; the web phone carries F32 and I64 state/);
});

test("a task or bundle whose state the web phone cannot carry is refused in one line", () => {
  assert.throws(() => taskState({ ...TASK, state_mode: "roaming" }), /state_mode "roaming" is not one this phone knows/);
  assert.throws(() => taskState({ ...TASK, state: [{ name: "bn.running_mean", shape: [3], dtype: "float16" }] }),
    /bn.running_mean:float16 is not float32 or int64/);
  const available = { available: true };
  const manifest = (stateInputs) => ({
    format_version: 1, model: "m", parameters: [{ ...PARAMS[0], trainable: true }],
    artifacts: { "model.onnx": available, "train_step.onnx": available, "weights.safetensors": available },
    signatures: { "train_step.onnx": { inputs: ["bn.weight", "x", "y", "lr", "mu", "anchor.bn.weight", ...stateInputs] } },
  });
  const both = ["state.bn.running_mean", "state.bn.num_batches_tracked"];
  checkManifest(manifest(both), TASK); // the same state: taken
  assert.throws(() => checkManifest(manifest(both), { params: PARAMS }), BundleError); // a server without state
  assert.throws(() => checkManifest(manifest(both.slice(0, 1)), TASK), /train_step.onnx carries the state \[bn.running_mean\], the task/);
  const noWeights = manifest(both);
  noWeights.artifacts["weights.safetensors"] = { available: false, op: null, reason: "not written" };
  assert.throws(() => checkManifest(noWeights, TASK), /weights.safetensors unavailable for model m/);
  checkManifest({ ...manifest([]), artifacts: { "model.onnx": available, "train_step.onnx": available } }, { params: PARAMS });
});
