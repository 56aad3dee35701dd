// UpdateEncoder: clip -> local DP noise -> (+ residual) -> sparsify -> quantize -> bytes, the
// pipeline of FORMAT.md section 6 assembled once from the config (protocol/codec/encoder.py).
// A step the config leaves out is not in the list. All randomness comes from the one `rng`
// passed in (CryptoRandom in the app), in step order.

import { encodeWire } from "../wire/wire.js";
import { clip } from "./clip.js";
import { encoderConfig } from "./config.js";
import { ErrorFeedback } from "./feedback.js";
import { gaussianNoise, laplaceNoise } from "./noise.js";
import { calibrateNoiseMultiplier } from "./privacy.js";
import { keepAll, randK, topK } from "./sparsify.js";
import { stateTensors } from "./state.js";
import { float32Values, quantValues, toWire } from "./values.js";

/** z as configured, or calibrated so one release is (epsilon, delta)-DP under RDP accounting. */
export function resolveNoiseMultiplier(config) {
  if (config.noise === null) return null;
  if (config.noise_multiplier !== null) return config.noise_multiplier;
  return calibrateNoiseMultiplier(config.noise, config.epsilon, config.delta);
}

function denseSteps(c, z) {
  const steps = [];
  if (c.clip !== null) steps.push((u) => clip(u, { bound: c.clip, perLayer: c.per_layer_clip, ord: c.clip_ord }));
  if (z !== null) {
    const scale = z * c.clip;
    steps.push(c.noise === "gaussian" ? (u, rng) => gaussianNoise(u, scale, rng) : (u, rng) => laplaceNoise(u, scale, rng));
  }
  return steps;
}

function asFloat64(delta) {
  return delta.map(({ name, shape, data }) => {
    const d = Float64Array.from(data);
    if (!d.every(Number.isFinite)) throw new RangeError(`delta ${name} holds NaN or Inf`);
    return { name, shape: [...shape], data: d };
  });
}

export class UpdateEncoder {
  /** `codec`: a task's codec mapping (EncoderConfig fields); `rng`: an object with random(). */
  constructor(codec, rng) {
    this.config = encoderConfig(codec);
    this.rng = rng;
    this.noiseMultiplier = resolveNoiseMultiplier(this.config);
    this.steps = denseSteps(this.config, this.noiseMultiplier);
    const c = this.config;
    if (c.sparsify === "topk") this.sparsify = (u) => topK(u, c);
    else if (c.sparsify === "randk") this.sparsify = (u) => randK(u, { ...c, rescale: c.randk_rescale }, this.rng);
    else this.sparsify = keepAll;
    this.values = c.quant_bits === 32
      ? (v) => float32Values(v)
      : (v) => quantValues(v, c.quant_bits, c.chunk, c.stochastic_rounding ? this.rng : null);
    this.feedback = c.error_feedback ? new ErrorFeedback(c.ef_decay) : null;
    this.previous = null; // the residual before the last encode, for rollback
  }

  /**
   * delta: [{ name, shape, data }] (params' - params(v)), meta: the update meta, staleness:
   * model versions between the residual's base version and this delta's, state: the model's
   * state after training ([{ name, shape, data }], FORMAT.md section 11), appended as it is.
   * Returns the message.
   */
  async encode(delta, meta, { staleness = 0, state = [] } = {}) {
    if (!Number.isInteger(staleness) || staleness < 0) throw new RangeError(`staleness must be an int >= 0, got ${staleness}`);
    let update = asFloat64(delta);
    for (const step of this.steps) update = step(update, this.rng);
    if (this.feedback) {
      this.previous = this.feedback.state();
      update = this.feedback.addTo(update, staleness);
    }
    const picks = this.sparsify(update);
    const sections = picks.map((p) => this.values(p.values));
    const wire = update.map((t, i) => toWire(t.name, t.shape, picks[i], sections[i]));
    if (this.feedback) {
      this.feedback.keep(update, picks, sections.map((s) => s.decoded()));
      this.feedback.baseVersion = Number.isInteger(meta.base_version) ? meta.base_version : null;
    }
    return encodeWire("update", meta, [...wire, ...stateTensors(state)], { compress: this.config.compress });
  }

  /** meta.base_version of the last encoded update: staleness = new base - this. */
  get residualBaseVersion() {
    return this.feedback ? this.feedback.baseVersion : null;
  }

  /** Plain data for IndexedDB (the error-feedback residual); null without error feedback. */
  state() {
    return this.feedback ? this.feedback.state() : null;
  }

  load(state) {
    if (this.feedback && state) this.feedback.load(state);
  }

  /** Undo the residual change of the last encode (the server refused the update). */
  rollback() {
    if (this.feedback && this.previous) this.feedback.load(this.previous);
    this.previous = null;
  }

  /** What one encode costs in privacy: { mechanism, z } or null without noise. */
  release() {
    return this.noiseMultiplier === null ? null : { mechanism: this.config.noise, z: this.noiseMultiplier };
  }
}
