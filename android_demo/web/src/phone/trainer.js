// Training and evaluation on the phone with onnxruntime-web (WASM, one thread), from the
// bundle's graphs (export/onnx_export.py):
//   train_step.onnx (params..., x, y, lr, mu, anchor.<param>...) -> (loss, new.<param>...)
//     one SGD step on the mean cross-entropy plus the FedProx term mu/2 ||w - anchor||^2
//   model.onnx      (x, params...) -> logits
// Parameters live here as Float32Arrays between steps, as in device_runtime/runtimes/onnx_runtime.py.
// The runtime files come from this server (/phone/vendor/), never from a CDN.

import * as ort from "../../vendor/ort.wasm.min.mjs";

import { MODEL_ONNX, TRAIN_STEP_ONNX } from "./bundle.js";
import { dropInitializers } from "./onnx_graph.js";

ort.env.wasm.wasmPaths = new URL("../../vendor/", import.meta.url).href;
ort.env.wasm.numThreads = 1; // a phone core; no SharedArrayBuffer needed
ort.env.wasm.proxy = false;
ort.env.logLevel = "error";

const ANCHOR = "anchor.";
const NEW = "new.";

const f32 = (data, dims) => new ort.Tensor("float32", data, dims);

export class WasmTrainer {
  static async create(files, manifest) {
    const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    const trainable = manifest.parameters.filter((p) => p.trainable);
    const step = await ort.InferenceSession.create(files[TRAIN_STEP_ONNX], opts);
    // the weights become plain inputs: onnxruntime-web will not override initializers
    const inference = dropInitializers(files[MODEL_ONNX], trainable.map((p) => p.name));
    const infer = await ort.InferenceSession.create(inference, opts);
    const sig = manifest.signatures[TRAIN_STEP_ONNX];
    const missing = [...sig.inputs.filter((n) => !step.inputNames.includes(n)), ...sig.outputs.filter((n) => !step.outputNames.includes(n))];
    if (missing.length) throw new Error(`${TRAIN_STEP_ONNX} lacks ${missing}`);
    const state = sig.inputs.filter((n) => n.startsWith("state."));
    if (state.length) {
      throw new Error(`this model keeps batch norm statistics (${state.slice(0, 2)}, ...), which the web phone does not carry; `
        + "phones on Python, ExecuTorch or ONNX Runtime do (docs/model-state.md)");
    }
    return new WasmTrainer(step, infer, trainable, manifest.input_shape);
  }

  constructor(step, infer, params, inputShape) {
    this.step = step;
    this.infer = infer;
    this.params = params; // [{ name, shape }] in manifest order
    this.inputShape = inputShape; // [C, H, W] of one example
    this.pixels = inputShape.reduce((a, b) => a * b, 1);
    this.stepMs = []; // wall time of every train step run so far
  }

  /**
   * Local SGD from `start` (Map name -> Float32Array) over `data` ({ x: Float32Array(N*C*H*W),
   * y: labels }) for plan.local_epochs shuffled passes. Returns { params, loss, steps }.
   */
  async train(start, data, plan, rng) {
    const n = data.y.length;
    const scalars = { lr: f32(new Float32Array([plan.lr]), []), mu: f32(new Float32Array([plan.prox_mu ?? 0]), []) };
    const anchors = {}; // FedAvg passes the weights themselves: mu = 0 makes the term vanish
    let current = {};
    for (const { name, shape } of this.params) {
      anchors[ANCHOR + name] = f32(start.get(name), shape);
      current[name] = f32(Float32Array.from(start.get(name)), shape);
    }
    let total = 0;
    let steps = 0;
    for (let epoch = 0; epoch < plan.local_epochs; epoch++) {
      const order = shuffled(n, rng);
      for (let s = 0; s < n; s += plan.batch_size) {
        const idx = order.slice(s, s + plan.batch_size);
        const t0 = performance.now();
        const out = await this.step.run({ ...current, ...anchors, ...scalars, ...this.batch(data, idx) });
        this.stepMs.push(performance.now() - t0);
        current = Object.fromEntries(this.params.map(({ name }) => [name, out[NEW + name]]));
        total += out.loss.data[0];
        steps++;
      }
    }
    const params = new Map(this.params.map(({ name }) => [name, current[name].data]));
    return { params, loss: total / Math.max(steps, 1), steps, examples: n };
  }

  /**
   * Mean wall time of one step over `steps` back-to-back steps on one batch of `data` (the
   * new weights fed back, as in training): a benchmark without shuffling or bookkeeping.
   */
  async timeSteps(start, data, batchSize, steps = 200) {
    const idx = Array.from({ length: Math.min(batchSize, data.y.length) }, (_, i) => i);
    const fixed = { ...this.batch(data, idx), lr: f32(new Float32Array([0.01]), []), mu: f32(new Float32Array([0]), []) };
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

  /** Logits of `params` on `data` (model.onnx, one batch): Float32Array(N * classes). */
  async logits(params, data) {
    const feed = { x: f32(data.x, [data.y.length, ...this.inputShape]) };
    for (const { name, shape } of this.params) feed[name] = f32(params.get(name), shape);
    return (await this.infer.run(feed)).logits.data;
  }

  /** Mean cross-entropy and accuracy of `params` on `data`. */
  async evaluate(params, data) {
    const n = data.y.length;
    if (!n) return { loss: null, accuracy: null };
    const logits = await this.logits(params, data);
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
  async predict(params, x) {
    const row = await this.logits(params, { x, y: [0] });
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
