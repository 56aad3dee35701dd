// The on-device bundle (export/manifest.py): GET /v1/bundle is the manifest, GET
// /v1/bundle/{file} each artifact. Every file is checked against the manifest's sha256 with
// WebCrypto before it is used, and the manifest's trainable parameters must be the task's
// (names, shapes, float32), as export/bundle.py's verify_file_bytes and the Python phone do.
// The verified files are kept for offline use (offline.js) and checked again when read back.
// A model with state (batch norm running statistics, model_state.js) must carry the task's state
// in its training program, and also brings weights.safetensors: its initial statistics.

import { recall, remember } from "./offline.js";
import { signatureState, taskState } from "./model_state.js";

export const MODEL_ONNX = "model.onnx";
export const TRAIN_STEP_ONNX = "train_step.onnx";
export const WEIGHTS = "weights.safetensors";

/** The artifacts this phone downloads: both ONNX graphs, and for a model with state its initial weights. */
export function bundleFiles(manifest) {
  return signatureState(manifest.signatures?.[TRAIN_STEP_ONNX]?.inputs ?? []).length
    ? [MODEL_ONNX, TRAIN_STEP_ONNX, WEIGHTS] : [MODEL_ONNX, TRAIN_STEP_ONNX];
}

export class BundleError extends Error {}

async function sha256Hex(bytes) {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Throw BundleError unless the manifest trains exactly the task's parameters. */
export function checkManifest(manifest, task) {
  if (manifest.format_version !== 1) throw new BundleError(`bundle format_version ${manifest.format_version}; this phone reads 1`);
  const trainable = manifest.parameters.filter((p) => p.trainable);
  const mine = trainable.map((p) => `${p.name}:${p.shape.join("x")}:${p.dtype}`).join(",");
  const theirs = task.params.map((p) => `${p.name}:${p.shape.join("x")}:${p.dtype}`).join(",");
  if (mine !== theirs) throw new BundleError(`bundle parameters [${mine}] are not the task's [${theirs}]`);
  let state;
  try {
    state = taskState(task).map((s) => s.name).sort().join(",");
  } catch (err) {
    throw new BundleError(err.message);
  }
  const carried = signatureState(manifest.signatures?.[TRAIN_STEP_ONNX]?.inputs ?? []).sort().join(",");
  if (state !== carried) throw new BundleError(`${TRAIN_STEP_ONNX} carries the state [${carried}], the task [${state}]`);
  for (const file of bundleFiles(manifest)) {
    const info = manifest.artifacts[file];
    if (!info?.available) throw new BundleError(`${file} unavailable for model ${manifest.model}: op=${info?.op}: ${info?.reason}`);
  }
}

async function verified(manifest, name, data) {
  const actual = await sha256Hex(data);
  if (actual !== manifest.artifacts[name].sha256) {
    throw new BundleError(`${name}: sha256 ${actual} != manifest ${manifest.artifacts[name].sha256}`);
  }
  return data;
}

/** Download and verify the manifest and its files (bundleFiles): { manifest, files: {name: bytes}, bytes }. */
export async function downloadBundle(api, task) {
  const raw = (await api.request("GET", "/v1/bundle")).data;
  const manifest = JSON.parse(new TextDecoder().decode(raw));
  checkManifest(manifest, task);
  const files = {};
  let bytes = raw.length;
  for (const name of bundleFiles(manifest)) {
    files[name] = await verified(manifest, name, (await api.request("GET", `/v1/bundle/${name}`)).data);
    bytes += files[name].length;
  }
  await remember("/v1/bundle", raw);
  await Promise.all(Object.entries(files).map(([name, data]) => remember(`/v1/bundle/${name}`, data)));
  return { manifest, files, bytes };
}

/** The bundle kept from the last download, verified again; null when there is none. */
export async function cachedBundle(task) {
  const raw = await recall("/v1/bundle");
  if (!raw) return null;
  const manifest = JSON.parse(new TextDecoder().decode(raw));
  checkManifest(manifest, task);
  const files = {};
  for (const name of bundleFiles(manifest)) {
    const data = await recall(`/v1/bundle/${name}`);
    if (!data) return null;
    files[name] = await verified(manifest, name, data);
  }
  return { manifest, files, bytes: 0 };
}
