// A model's state on the web phone (FORMAT.md section 11): the running statistics of its batch
// norm layers, which train_step.onnx takes as `state.<buffer>` inputs and returns updated as
// `new_state.<buffer>` outputs (export/state_outputs.py). The task names them (`task.state`:
// [{ name, shape, dtype }]) and says where a phone's training starts from (`task.state_mode`):
//   "shared" (default): the state inside the server's model message, as `state:<buffer>` tensors;
//   "local" (FedBN):    the phone's own, from its last training (the bundle's initial state, from
//                       weights.safetensors, the first time), kept in IndexedDB across reloads.
// Either way the update carries the state the training ended with (codec/state.js).
//
// A state here is a Map buffer name -> Float32Array (statistics) or BigInt64Array (counters).

import { STATE_PREFIX } from "../codec/state.js";

export const STATE_IN = "state."; // train_step.onnx inputs
export const STATE_OUT = "new_state."; // train_step.onnx outputs
const MODES = ["shared", "local"];
const ARRAYS = { float32: Float32Array, int64: BigInt64Array };
const SAFETENSORS_DTYPES = { F32: "float32", I64: "int64" };
const OWN_STATE = "modelState"; // the PhoneStore key of a phone's own state (local mode)

export class StateError extends Error {}

/** The task's state spec ([{ name, shape, dtype }], empty for a model without), checked: one line when this phone cannot carry it. */
export function taskState(task) {
  const spec = task.state ?? [];
  if (!spec.length) return [];
  if (!MODES.includes(task.state_mode)) {
    throw new StateError(`the task's state_mode ${JSON.stringify(task.state_mode)} is not one this phone knows (${MODES})`);
  }
  const odd = spec.filter((s) => !Object.hasOwn(ARRAYS, s.dtype));
  if (odd.length) {
    throw new StateError(`the model's state ${odd.map((s) => `${s.name}:${s.dtype}`)} is not float32 or int64, which the web phone cannot carry`);
  }
  return spec;
}

/** The tensors a model message of this task carries: the parameters, and in shared mode the state. */
export function modelTensors(task) {
  const state = task.state_mode === "shared" ? taskState(task) : [];
  return [...task.params, ...state.map((s) => ({ ...s, name: STATE_PREFIX + s.name }))];
}

/** A decoded model message's tensors (Map) split: { params: Map, state: Map or null when it carries none }. */
export function splitModel(tensors) {
  const params = new Map();
  const state = new Map();
  for (const [name, data] of tensors) {
    if (name.startsWith(STATE_PREFIX)) state.set(name.slice(STATE_PREFIX.length), data);
    else params.set(name, data);
  }
  return { params, state: state.size ? state : null };
}

/** The state buffers a graph's input names carry (`state.<buffer>`), in call order. */
export function signatureState(inputs) {
  return inputs.filter((n) => n.startsWith(STATE_IN)).map((n) => n.slice(STATE_IN.length));
}

/**
 * The tensors named `names` in a safetensors file (8-byte little-endian header length, JSON
 * header { name: { dtype, shape, data_offsets } }, then the data): Map name -> { dtype, shape, data }.
 */
export function readSafetensors(bytes, names, file = "weights.safetensors") {
  const fail = (why) => new StateError(`${file}: ${why}`);
  if (bytes.length < 8) throw fail("shorter than its header length");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > bytes.length - 8) throw fail("header longer than the file");
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLen)));
  const data = bytes.subarray(8 + headerLen);
  const out = new Map();
  for (const name of names) {
    const entry = header[name];
    if (!entry) throw fail(`no tensor ${name}, a running statistic the training program carries`);
    const dtype = SAFETENSORS_DTYPES[entry.dtype];
    if (!dtype) throw fail(`${name} is ${entry.dtype}; the web phone carries F32 and I64 state`);
    const [start, end] = entry.data_offsets;
    const Typed = ARRAYS[dtype];
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (end > data.length || end - start !== count * Typed.BYTES_PER_ELEMENT) throw fail(`${name}: bad data_offsets`);
    out.set(name, { dtype, shape: entry.shape, data: new Typed(data.slice(start, end).buffer) }); // a copy, aligned
  }
  return out;
}

/** `state` (a Map) if it holds exactly `spec`'s buffers with their sizes and dtypes; else null. */
export function fitState(state, spec) {
  if (!state || state.size !== spec.length) return null;
  const size = (s) => s.shape.reduce((a, b) => a * b, 1);
  const fits = spec.every((s) => state.get(s.name) instanceof ARRAYS[s.dtype] && state.get(s.name).length === size(s));
  return fits ? state : null;
}

/**
 * The state a training starts from, as device_runtime's ProgramState.set: each of `spec`'s buffers
 * from `given` (a Map, or null) when it holds one of that size and dtype, else from `initial` (the
 * bundle's). A Map in `spec`'s order.
 */
export function completeState(given, spec, initial) {
  const size = (s) => s.shape.reduce((a, b) => a * b, 1);
  const fits = (s, v) => v instanceof ARRAYS[s.dtype] && v.length === size(s);
  return new Map(spec.map((s) => [s.name, fits(s, given?.get(s.name)) ? given.get(s.name) : initial.get(s.name)]));
}

/** The state as the encoder takes it: [{ name, shape, data }] in `spec`'s order. */
export function stateList(state, spec) {
  return spec.map(({ name, shape }) => ({ name, shape, data: state.get(name) }));
}

/** This phone's own state (local mode), kept across reloads; null when none fits `spec`. */
export async function loadOwnState(store, spec) {
  const saved = await store.get(OWN_STATE);
  return saved ? fitState(new Map(saved), spec) : null;
}

export async function saveOwnState(store, state) {
  await store.set(OWN_STATE, [...state]); // typed arrays are structured-cloned as they are
}
