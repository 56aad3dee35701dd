// Steps 4 and 5: encode the values picked for each tensor, then lay the tensor out on the
// wire: "dense"/"quant" for a whole tensor, "sparse" (the shorter of bitmap and varint index
// coding) for a pick (protocol/codec/quantize.py). Each coder also says what the server will
// decode, which error feedback needs.

import { encodeDense, encodeSparse } from "../wire/encodings.js";
import { dequantize, encodeSection, quantize } from "../wire/quant.js";

/** Values as float32: { bits: 32, fields: {}, blob, decoded() }. */
export function float32Values(values) {
  const v32 = Float32Array.from(values);
  return { bits: 32, fields: {}, blob: encodeDense("float32", v32), decoded: () => v32 };
}

/** Values as a quantized section (stochastic rounding when `rng` is given). */
export function quantValues(values, bits, chunk, rng) {
  const { scales, codes } = quantize(values, bits, chunk, rng);
  return {
    bits,
    fields: { bits, chunk },
    blob: encodeSection(scales, codes, bits),
    decoded: () => dequantize(scales, codes, bits, chunk),
  };
}

/** The wire tensor of one picked tensor: { name, dtype, shape, encoding, fields, blob }. */
export function toWire(name, shape, pick, section) {
  if (pick.indices === null) {
    const encoding = section.bits === 32 ? "dense" : "quant";
    return { name, dtype: "float32", shape, encoding, fields: section.fields, blob: section.blob };
  }
  const size = shape.reduce((a, b) => a * b, 1);
  const { fields, blob } = encodeSparse(pick.indices, size, section.blob, section.bits, section.fields.chunk);
  return { name, dtype: "float32", shape, encoding: "sparse", fields, blob };
}
