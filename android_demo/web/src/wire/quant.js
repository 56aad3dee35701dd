// Uniform quantization with per-chunk scales (FORMAT.md section 4), as protocol/quant.py.
//
// A chunk with scale s = max|x| maps x to a code q in [0, L], L = 2^bits - 1, on the grid
// x_hat = s (2q - L) / L. Stochastic rounding (q = floor(u + r), r ~ U[0, 1)) is unbiased:
// the QSGD quantizer (Alistarh et al. 2017) with a max-norm scale per chunk. Every step
// below is one binary64 operation in the normative order, so the codes equal Python's.

import { MalformedMessage, NonFiniteValues } from "./errors.js";
import { BIT_WIDTHS, packCodes, packedNbytes, unpackCodes } from "./packing.js";

export const MAX_CHUNK = 1 << 24;

export const levels = (bits) => (1 << bits) - 1;
export const numChunks = (count, chunk) => Math.ceil(count / chunk);
export const quantNbytes = (count, bits, chunk) => 4 * numChunks(count, chunk) + packedNbytes(count, bits);

/**
 * values (n) -> { scales: Float32Array(chunks), codes: Uint8Array(n) }. `rng` null means
 * deterministic rounding (round half up); otherwise one rng.random() draw per element, in order.
 */
export function quantize(values, bits, chunk, rng) {
  const x = Float32Array.from(values); // the values are first rounded to float32
  const n = x.length;
  const L = levels(bits);
  const scales = new Float32Array(numChunks(n, chunk));
  const codes = new Uint8Array(n);
  for (let c = 0; c < scales.length; c++) {
    const lo = c * chunk;
    const hi = Math.min(n, lo + chunk);
    let s = 0;
    for (let i = lo; i < hi; i++) s = Math.max(s, Math.abs(x[i]));
    scales[c] = s;
    for (let i = lo; i < hi; i++) {
      if (s === 0) {
        if (rng) rng.random(); // the draw is still consumed, as in the reference
        continue; // an all-zero chunk has code 0 throughout
      }
      const t = x[i] / s;
      const u = (t + 1) * L * 0.5;
      const q = Math.floor(u + (rng ? rng.random() : 0.5));
      codes[i] = Math.min(q, L); // u + r can round up to L + 1 when u = L
    }
  }
  return { scales, codes };
}

/** x_hat = float32((s * (2q - L)) / L), computed in binary64: the decoder's formula. */
export function dequantize(scales, codes, bits, chunk) {
  const L = levels(bits);
  const out = new Float32Array(codes.length);
  for (let i = 0; i < codes.length; i++) out[i] = (scales[Math.floor(i / chunk)] * (2 * codes[i] - L)) / L;
  return out;
}

export function encodeSection(scales, codes, bits) {
  const out = new Uint8Array(4 * scales.length + packedNbytes(codes.length, bits));
  const view = new DataView(out.buffer);
  scales.forEach((s, i) => view.setFloat32(4 * i, s, true));
  out.set(packCodes(codes, bits), 4 * scales.length);
  return out;
}

/** Scales then codes of `count` values -> Float32Array(count); checks sizes, scales, padding. */
export function decodeSection(blob, count, bits, chunk) {
  const ns = numChunks(count, chunk);
  if (blob.length !== quantNbytes(count, bits, chunk)) {
    throw new MalformedMessage(
      `${count} values at ${bits} bits in chunks of ${chunk} need ${quantNbytes(count, bits, chunk)} bytes, got ${blob.length}`,
    );
  }
  const view = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const scales = new Float32Array(ns);
  for (let c = 0; c < ns; c++) scales[c] = view.getFloat32(4 * c, true);
  if (!scales.every(Number.isFinite)) throw new NonFiniteValues("quantization scale is NaN or Inf");
  for (let c = 0; c < ns; c++) {
    if (view.getUint8(4 * c + 3) & 0x80) throw new MalformedMessage("quantization scales must be non-negative (sign bit clear)");
  }
  return dequantize(scales, unpackCodes(blob.subarray(4 * ns), count, bits), bits, chunk);
}

const isInt = (v) => typeof v === "number" && Number.isInteger(v);

/** Validate the "bits" and "chunk" header keys of a quantized section. */
export function checkQuantParams(fields) {
  const { bits, chunk } = fields;
  if (!isInt(bits) || !BIT_WIDTHS.includes(bits)) throw new MalformedMessage(`bits must be one of ${BIT_WIDTHS}, got ${bits}`);
  if (!isInt(chunk) || chunk < 1 || chunk > MAX_CHUNK) {
    throw new MalformedMessage(`chunk must be an int in [1, ${MAX_CHUNK}], got ${chunk}`);
  }
  return [bits, chunk];
}
