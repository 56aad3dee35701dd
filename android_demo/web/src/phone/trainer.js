// Training and evaluation on the phone with onnxruntime-web (WASM, one thread), from the
// bundle's graphs (export/onnx_export.py):
//   train_step.onnx (params..., x, y, lr, mu, anchor.<param>..., state.<buffer>...)
//                   -> (loss, new.<param>..., new_state.<buffer>...)
//     one SGD step on the mean cross-entropy plus the FedProx term mu/2 ||w - anchor||^2; a model
//     with batch norm also takes its running statistics and returns them updated (model_state.js)
//   model.onnx      (x, params..., <running_mean|running_var>...) -> logits
// Parameters and state live here as typed arrays between steps, as in
// device_runtime/runtimes/onnx_runtime.py. The runtime files come from this server
// (/phone/vendor/), never from a CDN.

import * as ort from "../../vendor/ort.wasm.min.mjs";

import { MODEL_ONNX, TRAIN_STEP_ONNX, WEIGHTS } from "./bundle.js";
import { STATE_IN, STATE_OUT, StateError, readSafetensors, signatureState } from "./model_state.js";
import { dropInitializers } from "./onnx_graph.js";

ort.env.wasm.wasmPaths = new URL("../../vendor/", import.meta.url).href;
ort.env.wasm.numThreads = 1; // a phone core; no SharedArrayBuffer needed
ort.env.wasm.proxy = false;
ort.env.logLevel = "error";

const ANCHOR = "anchor.";
const NEW = "new.";

const f32 = (data, dims) => new ort.Tensor("float32", data, dims);
const tensor = (data, dims) => new ort.Tensor(data instanceof BigInt64Array ? "int64" : "float32", data, dims);

export class WasmTrainer {
  static async create(files, manifest) {
    const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    const trainable = manifest.parameters.filter((p) => p.trainable);
    const sig = manifest.signatures[TRAIN_STEP_ONNX];
    const names = signatureState(sig.inputs);
    // the initial running statistics (the bundle's weights file): the start of a phone's own state
    const initial = names.length ? readSafetensors(files[WEIGHTS], names) : new Map();
    const state = names.map((name) => ({ name, shape: initial.get(name).shape, dtype: initial.get(name).dtype }));
    const evalState = names.filter((n) => (manifest.signatures[MODEL_ONNX]?.inputs ?? []).includes(n));
    const step = await ort.InferenceSession.create(files[TRAIN_STEP_ONNX], opts);
    // the weights and statistics become plain inputs: onnxruntime-web will not override initializers
    const inference = dropInitializers(files[MODEL_ONNX], [...trainable.map((p) => p.name), ...evalState]);
    const infer = await ort.InferenceSession.create(inference, opts);
    const missing = [...sig.inputs.filter((n) => !step.inputNames.includes(n)), ...sig.outputs.filter((n) => !step.outputNames.includes(n))];
    if (missing.length) throw new Error(`${TRAIN_STEP_ONNX} lacks ${missing}`);
    const unfed = names.filter((n) => !sig.outputs.includes(STATE_OUT + n));
    if (unfed.length) throw new StateError(`${TRAIN_STEP_ONNX} takes the running statistics ${unfed} but does not return them updated`);
    const trainer = new WasmTrainer(step, infer, trainable, manifest.input_shape);
    trainer.stateSpec = state; // [{ name, shape, dtype }] in call order; empty without batch norm
    trainer.evalState = evalState; // the statistics model.onnx evaluates with
    trainer.initialState = new Map([...initial].map(([n, t]) => [n, t.data]));
    return trainer;
  }

  constructor(step, infer, params, inputShape) {
    this.step = step;
    this.infer = infer;
    this.params = params; // [{ name, shape }] in manifest order
    this.inputShape = inputShape; // [C, H, W] of one example
    this.pixels = inputShape.reduce((a, b) => a * b, 1);
    this.stepMs = []; // wall time of every train step run so far
    this.stateSpec = [];
    this.evalState = [];
    this.initialState = new Map();
  }

  /** `state` (Map buffer -> typed array; null: the bundle's initial state) as the step's state inputs. */
  stateFeed(state, names = this.stateSpec.map((s) => s.name), prefix = STATE_IN) {
    const shapes = new Map(this.stateSpec.map((s) => [s.name, s.shape]));
    return Object.fromEntries(names.map((n) => [prefix + n, tensor((state ?? this.initialState).get(n), shapes.get(n))]));
  }

  /**
   * Local SGD from `start` (Map name -> Float32Array) and the running statistics `state` (Map;
   * null: the bundle's initial ones) over `data` ({ x: Float32Array(N*C*H*W), y: labels }) for
   * plan.local_epochs shuffled passes. Returns { params, state (Map), loss, steps, examples }.
   */
  async train(start, data, plan, rng, state = null) {
    const n = data.y.length;
    const scalars = { lr: f32(new Float32Array([plan.lr]), []), mu: f32(new Float32Array([plan.prox_mu ?? 0]), []) };
    const anchors = {}; // FedAvg passes the weights themselves: mu = 0 makes the term vanish
    let current = {};
    for (const { name, shape } of this.params) {
      anchors[ANCHOR + name] = f32(start.get(name), shape);
      current[name] = f32(Float32Array.from(start.get(name)), shape);
    }
    let stats = this.stateFeed(state);
    let total = 0;
    let steps = 0;
    for (let epoch = 0; epoch < plan.local_epochs; epoch++) {
      const order = shuffled(n, rng);
      for (let s = 0; s < n; s += plan.batch_size) {
        const idx = order.slice(s, s + plan.batch_size);
        const t0 = performance.now();
        const out = await this.step.run({ ...current, ...anchors, ...scalars, ...this.batch(data, idx), ...stats });
        this.stepMs.push(performance.now() - t0);
        current = Object.fromEntries(this.params.map(({ name }) => [name, out[NEW + name]]));
        stats = Object.fromEntries(this.stateSpec.map(({ name }) => [STATE_IN + name, out[STATE_OUT + name]]));
        total += out.loss.data[0];
        steps++;
      }
    }
    const params = new Map(this.params.map(({ name }) => [name, current[name].data]));
    const ended = new Map(this.stateSpec.map(({ name }) => [name, stats[STATE_IN + name].data]));
    return { params, state: ended, loss: total / Math.max(steps, 1), steps, examples: n };
  }

  /**
   * Mean wall time of one step over `steps` back-to-back steps on one batch of `data` (the
   * new weights fed back, as in training): a benchmark without shuffling or bookkeeping.
   */
  async timeSteps(start, data, batchSize, steps = 200) {
    const idx = Array.from({ length: Math.min(batchSize, data.y.length) }, (_, i) => i);
    const fixed = { ...this.batch(data, idx), lr: f32(new Float32Array([0.01]), []), mu: f32(new Float32Array([0]), []),
      ...this.stateFeed(null) };
    let current = {};
    for (const { name, shape } of this.params) {
      current[name] = f32(Float32Array.from(start.get(name)), shape);
      fixed[ANCHOR + name] = f32(start.get(name), shape);
    }
    const run = async () => {
      const out = await this.step.run({ ...current, ...fixed });
      current = Object.fromEntries(this.params.map(({ name }) => [name, out[NEW + name]]));
    };
    for (let i = 0; i < 10; i++) await run(); // warm up
    const t0 = performance.now();
    for (let i = 0; i < steps; i++) await run();
    return (performance.now() - t0) / steps;
  }

  /** Wall time per train step so far: median and mean (the first step, which also warms up, left out). */
  stepStats() {
    const warm = this.stepMs.length > 1 ? this.stepMs.slice(1) : this.stepMs;
    const sorted = [...warm].sort((a, b) => a - b);
    return { count: warm.length, medianMs: sorted[Math.floor(sorted.length / 2)], meanMs: warm.reduce((a, b) => a + b, 0) / warm.length };
  }

  /** Logits of `params` with the running statistics `state` (null: the initial ones) on `data` (model.onnx, one batch): Float32Array(N * classes). */
  async logits(params, data, state = null) {
    const feed = { x: f32(data.x, [data.y.length, ...this.inputShape]), ...this.stateFeed(state, this.evalState, "") };
    for (const { name, shape } of this.params) feed[name] = f32(params.get(name), shape);
    return (await this.infer.run(feed)).logits.data;
  }

  /** Mean cross-entropy and accuracy of `params` (with the running statistics `state`) on `data`. */
  async evaluate(params, data, state = null) {
    const n = data.y.length;
    if (!n) return { loss: null, accuracy: null };
    const logits = await this.logits(params, data, state);
    const classes = logits.length / n;
    let loss = 0;
    let correct = 0;
    for (let i = 0; i < n; i++) {
      const row = logits.subarray(i * classes, (i + 1) * classes);
      const max = Math.max(...row);
      const logSum = Math.log(row.reduce((acc, v) => acc + Math.exp(v - max), 0)) + max;
      loss += logSum - row[data.y[i]];
      correct += row.indexOf(max) === data.y[i];
    }
    return { loss: loss / n, accuracy: correct / n };
  }

  /** The most likely class of one example (x: Float32Array of C*H*W values in [0, 1]). */
  async predict(params, x, state = null) {
    const row = await this.logits(params, { x, y: [0] }, state);
    return row.indexOf(Math.max(...row));
  }

  batch(data, idx) {
    const p = this.pixels;
    const x = new Float32Array(idx.length * p);
    idx.forEach((i, k) => x.set(data.x.subarray(i * p, (i + 1) * p), k * p));
    const y = BigInt64Array.from(idx, (i) => BigInt(data.y[i]));
    return { x: f32(x, [idx.length, ...this.inputShape]), y: new ort.Tensor("int64", y, [idx.length]) };
  }
}

function shuffled(n, rng) {
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng.random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}
