// The update encoder's config: the same fields, defaults and checks as protocol/codec/config.py
// (EncoderConfig), so the `codec` object of a server task means the same on every phone.
// A group left at its default leaves its step out.

export const DEFAULTS = Object.freeze({
  clip: null, // L2/L1 bound C; null: no clipping (then no noise either)
  per_layer_clip: false, // each of L tensors to C/sqrt(L) (L1: C/L)
  clip_ord: 2, // 2: L2 (Gaussian); 1: L1, which Laplace needs
  noise: null, // "gaussian" | "laplace" | null
  noise_multiplier: null, // std (Gaussian) / scale (Laplace) = noise_multiplier * clip
  epsilon: null, // ...or calibrate noise_multiplier to (epsilon, delta) per release
  delta: null,
  sparsify: null, // "topk" | "randk" | null
  density: null, // fraction kept: k = max(1, floor(density * n + 1/2))
  k: null, // ...or a count
  randk_rescale: true, // rand-k values times n/k (unbiased)
  error_feedback: false, // keep what was not sent and add it to the next update
  ef_decay: 1.0, // residual *= ef_decay ** staleness
  quant_bits: 32, // 32: float32; 8, 4, 2, 1: quantized
  stochastic_rounding: true, // false: round half up (reproducible)
  chunk: 256, // values per quantization scale
  compress: false, // zlib over the payload
});

const isNum = (x) => typeof x === "number";
const positive = (x) => isNum(x) && Number.isFinite(x) && x > 0;
const isBool = (x) => typeof x === "boolean";

function check(ok, message) {
  if (!ok) throw new RangeError(message);
}

/** A validated, frozen config from a task's `codec` mapping; unknown keys are an error. */
export function encoderConfig(values = {}) {
  const unknown = Object.keys(values).filter((k) => !Object.hasOwn(DEFAULTS, k)).sort();
  check(!unknown.length, `unknown encoder config keys [${unknown}]; known: [${Object.keys(DEFAULTS).sort()}]`);
  const c = { ...DEFAULTS, ...values };
  // clipping
  check(c.clip === null || positive(c.clip), `clip must be a positive finite number or null, got ${c.clip}`);
  check(isBool(c.per_layer_clip), "per_layer_clip must be a bool");
  check(!c.per_layer_clip || c.clip !== null, "per_layer_clip needs clip (the total bound to split over layers)");
  check(c.clip_ord === 1 || c.clip_ord === 2, `clip_ord must be 1 or 2, got ${c.clip_ord}`);
  // noise
  if (c.noise === null) {
    check([c.noise_multiplier, c.epsilon, c.delta].every((v) => v === null), "noise_multiplier/epsilon/delta are set but noise is null");
  } else {
    check(c.noise === "gaussian" || c.noise === "laplace", `noise must be 'gaussian', 'laplace' or null, got ${c.noise}`);
    check(c.clip !== null, "noise needs clip: without a norm bound the noise protects nothing");
    check(c.noise !== "laplace" || c.clip_ord === 1, "laplace noise is calibrated to L1 sensitivity: set clip_ord=1");
    const byTarget = c.epsilon !== null || c.delta !== null;
    check((c.noise_multiplier === null) === byTarget, "give either noise_multiplier or a target (epsilon, delta), not both or neither");
    check(c.noise_multiplier === null || positive(c.noise_multiplier), `noise_multiplier must be a positive finite number`);
    if (byTarget) {
      check(positive(c.epsilon), `epsilon must be a positive finite number, got ${c.epsilon}`);
      check(isNum(c.delta) && c.delta > 0 && c.delta < 1, `delta must be in (0, 1), got ${c.delta}`);
    }
  }
  // sparsification and error feedback
  if (c.sparsify === null) check(c.density === null && c.k === null, "density/k are set but sparsify is null");
  else {
    check(c.sparsify === "topk" || c.sparsify === "randk", `sparsify must be 'topk', 'randk' or null, got ${c.sparsify}`);
    check((c.density === null) !== (c.k === null), "sparsify needs exactly one of density (fraction) or k (count)");
    check(c.density === null || (isNum(c.density) && c.density > 0 && c.density <= 1), `density must be in (0, 1]`);
    check(c.k === null || (Number.isInteger(c.k) && c.k >= 1), `k must be an int >= 1, got ${c.k}`);
  }
  check(isBool(c.randk_rescale) && isBool(c.error_feedback), "randk_rescale and error_feedback must be bools");
  check(!c.error_feedback || c.sparsify !== null || c.quant_bits !== 32, "error_feedback needs a lossy step (sparsify or quant_bits < 32)");
  check(!(c.error_feedback && c.sparsify === "randk" && c.randk_rescale), "error_feedback with rand-k needs randk_rescale=false");
  check(isNum(c.ef_decay) && c.ef_decay >= 0 && c.ef_decay <= 1, `ef_decay must be in [0, 1], got ${c.ef_decay}`);
  // quantization and container
  check([32, 8, 4, 2, 1].includes(c.quant_bits), `quant_bits must be one of 32, 8, 4, 2, 1, got ${c.quant_bits}`);
  check(isBool(c.stochastic_rounding), "stochastic_rounding must be a bool");
  check(Number.isInteger(c.chunk) && c.chunk >= 1 && c.chunk <= 1 << 24, `chunk must be an int in [1, 2^24], got ${c.chunk}`);
  check(isBool(c.compress), "compress must be a bool");
  return Object.freeze(c);
}
