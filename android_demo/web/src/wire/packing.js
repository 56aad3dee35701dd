// Bit-level building blocks of wire format v1 (FORMAT.md sections 4 and 5): code packing,
// bitmaps and delta varints. Encoders trust their input; decoders check every byte and raise
// MalformedMessage on anything a conforming encoder cannot produce (as protocol/packing.py).

import { MalformedMessage } from "./errors.js";

export const BIT_WIDTHS = [1, 2, 4, 8];
export const MAX_VARINT_BYTES = 4; // indices are < 2^28

export const packedNbytes = (count, bits) => Math.ceil((count * bits) / 8);

/** Codes (< 2^bits) LSB-first: code i at bit (i*bits) mod 8 of byte floor(i*bits/8). */
export function packCodes(codes, bits) {
  const out = new Uint8Array(packedNbytes(codes.length, bits));
  for (let i = 0; i < codes.length; i++) {
    const bit = i * bits;
    out[bit >> 3] |= codes[i] << (bit & 7);
  }
  return out;
}

/** Inverse of packCodes; rejects a wrong length and non-zero padding bits. */
export function unpackCodes(blob, count, bits) {
  if (blob.length !== packedNbytes(count, bits)) {
    throw new MalformedMessage(`${count} codes of ${bits} bits need ${packedNbytes(count, bits)} bytes, got ${blob.length}`);
  }
  const mask = (1 << bits) - 1;
  const codes = new Uint8Array(count);
  for (let i = 0; i < count; i++) {
    const bit = i * bits;
    codes[i] = (blob[bit >> 3] >> (bit & 7)) & mask;
  }
  const used = (count * bits) & 7;
  if (used && blob[blob.length - 1] >> used) throw new MalformedMessage("padding bits after the last code must be zero");
  return codes;
}

export function encodeBitmap(indices, size) {
  const bits = new Uint8Array(size);
  for (const i of indices) bits[i] = 1;
  return packCodes(bits, 1);
}

/** Indices of set bits, increasing; checks length, padding and popcount. */
export function decodeBitmap(blob, size, nnz) {
  const bits = unpackCodes(blob, size, 1);
  const indices = [];
  for (let i = 0; i < size; i++) if (bits[i]) indices.push(i);
  if (indices.length !== nnz) throw new MalformedMessage(`bitmap has ${indices.length} set bits but nnz is ${nnz}`);
  return indices;
}

const varintSize = (v) => 1 + (v >= 1 << 7) + (v >= 1 << 14) + (v >= 1 << 21);
const gaps = (indices) => indices.map((i, k) => (k ? i - indices[k - 1] : i));

export const deltaVarintNbytes = (indices) => gaps(indices).reduce((n, g) => n + varintSize(g), 0);

/** i0, i1-i0, i2-i1, ... as unsigned LEB128 (low 7 bits first, bit 7 set on all but the last byte). */
export function encodeDeltaVarint(indices) {
  const out = [];
  for (let g of gaps(indices)) {
    while (g >= 0x80) {
      out.push((g & 0x7f) | 0x80);
      g >>>= 7;
    }
    out.push(g);
  }
  return Uint8Array.from(out);
}

/**
 * Inverse of encodeDeltaVarint. Rejects a count other than nnz, a varint over 4 bytes or
 * not in its shortest form, a zero gap after the first (duplicate) and an index >= size.
 */
export function decodeDeltaVarint(blob, size, nnz) {
  const ends = [];
  for (let i = 0; i < blob.length; i++) if (blob[i] < 0x80) ends.push(i);
  if (ends.length !== nnz || (blob.length && ends[ends.length - 1] !== blob.length - 1)) {
    throw new MalformedMessage(`index section does not hold exactly ${nnz} varints`);
  }
  const indices = [];
  let start = 0;
  let index = 0;
  for (const end of ends) {
    const length = end - start + 1;
    if (length > MAX_VARINT_BYTES) throw new MalformedMessage(`varint longer than ${MAX_VARINT_BYTES} bytes`);
    if (length > 1 && blob[end] === 0) throw new MalformedMessage("varint is not in its shortest form");
    let gap = 0;
    for (let j = 0; j < length; j++) gap += (blob[start + j] & 0x7f) * 2 ** (7 * j);
    if (indices.length && gap === 0) {
      throw new MalformedMessage("indices must be strictly increasing (a gap of 0 repeats an index)");
    }
    index += gap;
    indices.push(index);
    start = end + 1;
  }
  if (indices.length && index >= size) throw new MalformedMessage(`index ${index} is out of range for ${size} elements`);
  return indices;
}
