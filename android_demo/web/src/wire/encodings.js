// Per-tensor encodings of wire format v1: "dense", "quant" and "sparse" (FORMAT.md section 3),
// as protocol/encodings.py. Decoding is two-phase so that nothing is allocated before the
// header is trusted: `check` validates an encoding's own header keys against the tensor's
// shape and returns the [min, max] payload bytes they allow; `decode` then checks the bytes.
//
// Decoded tensors are { dtype, shape, data }: float32 -> Float32Array, float64 ->
// Float64Array, float16 -> Float32Array (exact), int32 -> Int32Array, int64 -> BigInt64Array.

import { MalformedMessage, NonFiniteValues } from "./errors.js";
import { MAX_VARINT_BYTES, decodeBitmap, decodeDeltaVarint, deltaVarintNbytes, encodeBitmap, encodeDeltaVarint } from "./packing.js";
import { checkQuantParams, decodeSection, quantNbytes } from "./quant.js";

export const DTYPES = {
  float32: { size: 4, Array: Float32Array, get: (v, o) => v.getFloat32(o, true), set: (v, o, x) => v.setFloat32(o, x, true) },
  float64: { size: 8, Array: Float64Array, get: (v, o) => v.getFloat64(o, true), set: (v, o, x) => v.setFloat64(o, x, true) },
  float16: { size: 2, Array: Float32Array, get: (v, o) => halfToFloat(v.getUint16(o, true)), set: (v, o, x) => v.setUint16(o, floatToHalf(x), true) },
  int32: { size: 4, Array: Int32Array, get: (v, o) => v.getInt32(o, true), set: (v, o, x) => v.setInt32(o, Number(x), true) },
  int64: { size: 8, Array: BigInt64Array, get: (v, o) => v.getBigInt64(o, true), set: (v, o, x) => v.setBigInt64(o, BigInt(x), true) },
};
const INDEX_CODINGS = ["bitmap", "varint"];
const isInt = (v) => typeof v === "number" && Number.isInteger(v);
const product = (shape) => shape.reduce((a, b) => a * b, 1);

export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** Round a number to the nearest float16 (ties to even) and return its bits. */
export function floatToHalf(x) {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (Number.isNaN(x)) return 0x7e00;
  if (a >= 65520) return sign | 0x7c00; // rounds to infinity
  if (a < 2 ** -14) return sign | roundEven(a * 2 ** 24); // subnormal (may round up to the smallest normal)
  const e = Math.floor(Math.log2(a));
  const exp = a >= 2 ** (e + 1) ? e + 1 : a < 2 ** e ? e - 1 : e; // guard against log2 rounding
  const mant = roundEven((a / 2 ** exp - 1) * 1024); // 1024 may carry into the exponent: still correct bits
  return sign | (((exp + 15) << 10) + mant);
}

function roundEven(v) {
  const f = Math.floor(v);
  const d = v - f;
  return d > 0.5 || (d === 0.5 && f % 2 === 1) ? f + 1 : f;
}

export function dtypeOf(name) {
  if (typeof name !== "string" || !Object.hasOwn(DTYPES, name)) {
    throw new MalformedMessage(`unknown dtype ${JSON.stringify(name)}; expected one of ${Object.keys(DTYPES).sort()}`);
  }
  return DTYPES[name];
}

function onlyKeys(fields, allowed, encoding) {
  const extra = Object.keys(fields).filter((k) => !allowed.includes(k)).sort();
  if (extra.length) throw new MalformedMessage(`encoding "${encoding}" does not define header keys ${extra}`);
}

function needFloat32(dtype, encoding) {
  if (dtype !== "float32") throw new MalformedMessage(`encoding "${encoding}" carries float32 tensors only, not ${dtype}`);
}

// --- dense ------------------------------------------------------------------------------------

/** Raw little-endian values of `data` (a typed array or array of numbers) as `dtype`. */
export function encodeDense(dtype, data) {
  const d = dtypeOf(dtype);
  const out = new Uint8Array(d.size * data.length);
  const view = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) d.set(view, i * d.size, data[i]);
  return out;
}

function checkDense(fields, shape, dtype) {
  onlyKeys(fields, [], "dense");
  const size = product(shape) * DTYPES[dtype].size;
  return [size, size];
}

function decodeDense(fields, blob, shape, dtype) {
  const d = DTYPES[dtype];
  const count = product(shape);
  if (blob.length !== count * d.size) throw new MalformedMessage(`dense tensor needs ${count * d.size} bytes, got ${blob.length}`);
  const view = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const data = new d.Array(count);
  for (let i = 0; i < count; i++) data[i] = d.get(view, i * d.size);
  if (dtype.startsWith("float") && !data.every(Number.isFinite)) throw new NonFiniteValues("tensor contains NaN or Inf");
  return data;
}

// --- quant ------------------------------------------------------------------------------------

function checkQuant(fields, shape, dtype) {
  onlyKeys(fields, ["bits", "chunk"], "quant");
  needFloat32(dtype, "quant");
  const [bits, chunk] = checkQuantParams(fields);
  const size = quantNbytes(product(shape), bits, chunk);
  return [size, size];
}

const decodeQuant = (fields, blob, shape) => decodeSection(blob, product(shape), fields.bits, fields.chunk);

// --- sparse -----------------------------------------------------------------------------------

/**
 * Header fields and blob of a sparse tensor: `indices` increasing, `values` already encoded
 * (float32 or a quantized section). The shorter index coding wins; a tie goes to the bitmap.
 */
export function encodeSparse(indices, size, values, bits, chunk) {
  const useVarint = deltaVarintNbytes(indices) < Math.ceil(size / 8);
  const index = useVarint ? encodeDeltaVarint(indices) : encodeBitmap(indices, size);
  const fields = { nnz: indices.length, index: useVarint ? "varint" : "bitmap", bits };
  if (bits !== 32) fields.chunk = chunk;
  const blob = new Uint8Array(index.length + values.length);
  blob.set(index);
  blob.set(values, index.length);
  return { fields, blob };
}

const valuesNbytes = (nnz, bits, chunk) => (bits === 32 ? 4 * nnz : quantNbytes(nnz, bits, chunk));

function sparseParams(fields, size) {
  const { nnz, index, bits } = fields;
  if (!isInt(nnz) || nnz < 0 || nnz > size) throw new MalformedMessage(`nnz must be an int in [0, ${size}], got ${nnz}`);
  if (!INDEX_CODINGS.includes(index)) throw new MalformedMessage(`index must be one of ${INDEX_CODINGS}, got ${index}`);
  if (bits === 32) {
    onlyKeys(fields, ["nnz", "index", "bits"], "sparse");
    return [nnz, index, 32, null];
  }
  onlyKeys(fields, ["nnz", "index", "bits", "chunk"], "sparse");
  const [b, chunk] = checkQuantParams(fields);
  return [nnz, index, b, chunk];
}

function checkSparse(fields, shape, dtype) {
  needFloat32(dtype, "sparse");
  const size = product(shape);
  const [nnz, index, bits, chunk] = sparseParams(fields, size);
  const values = valuesNbytes(nnz, bits, chunk);
  if (index === "bitmap") return [values + Math.ceil(size / 8), values + Math.ceil(size / 8)];
  return [values + nnz, values + MAX_VARINT_BYTES * nnz];
}

function decodeSparse(fields, blob, shape) {
  const size = product(shape);
  const [nnz, index, bits, chunk] = sparseParams(fields, size);
  const split = blob.length - valuesNbytes(nnz, bits, chunk);
  if (split < 0) throw new MalformedMessage("sparse tensor is shorter than its values section");
  let indices;
  if (index === "bitmap") {
    if (split !== Math.ceil(size / 8)) throw new MalformedMessage(`bitmap for ${size} elements needs ${Math.ceil(size / 8)} bytes`);
    indices = decodeBitmap(blob.subarray(0, split), size, nnz);
  } else indices = decodeDeltaVarint(blob.subarray(0, split), size, nnz);
  let values;
  if (bits === 32) {
    values = decodeDense({}, blob.subarray(split), [nnz], "float32");
  } else values = decodeSection(blob.subarray(split), nnz, bits, chunk);
  const out = new Float32Array(size); // +0.0 everywhere not sent
  indices.forEach((i, k) => {
    out[i] = values[k];
  });
  return out;
}

export const ENCODINGS = {
  dense: { check: checkDense, decode: decodeDense },
  quant: { check: checkQuant, decode: decodeQuant },
  sparse: { check: checkSparse, decode: decodeSparse },
};
