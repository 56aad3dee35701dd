// A model's state beside the update (FORMAT.md section 11), as protocol/codec/encoder.py's
// state_tensors: each buffer (batch norm running statistics and counters) as "state:<buffer>",
// dense, float32 (int64 for an integer counter), absolute values. The state never passes through
// the update's steps: it is not clipped, noised, error-fed, sparsified or quantized.

import { encodeDense } from "../wire/encodings.js";

export const STATE_PREFIX = "state:";

/** Wire tensors of `state` ([{ name, shape, data }] in the model's buffer order; data a Float32Array or BigInt64Array). */
export function stateTensors(state) {
  return state.map(({ name, shape, data }) => {
    const dtype = data instanceof BigInt64Array ? "int64" : "float32";
    if (dtype === "float32" && !Float32Array.from(data).every(Number.isFinite)) throw new RangeError(`state ${name} holds NaN or Inf`);
    return { name: STATE_PREFIX + name, dtype, shape: [...shape], encoding: "dense", fields: {}, blob: encodeDense(dtype, data) };
  });
}
