// Properties of the JavaScript update codec on the paths the golden vectors can only check by
// decoding (they depend on numpy's RNG): stochastic rounding, noise, rand-k, zlib, and the
// error-feedback state a phone keeps in IndexedDB. Each draws from a seeded generator.

import assert from "node:assert/strict";
import { test } from "node:test";
import { deflateSync } from "node:zlib";

import { UpdateEncoder } from "../src/codec/encoder.js";
import { CryptoRandom } from "../src/codec/rng.js";
import { float, formatFloat } from "../src/wire/canonical.js";
import { inflateZlib } from "../src/wire/inflate.js";
import { dequantize, quantize } from "../src/wire/quant.js";
import { decodeMessage } from "../src/wire/wire.js";

/** A seeded uniform generator (mulberry32 pairs -> 53 bits): reproducible tests. */
function seeded(seed) {
  let s = seed >>> 0;
  const u32 = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  return { random: () => ((u32() >>> 5) * 67108864 + (u32() >>> 6)) / 9007199254740992 };
}

const META = { update_id: "web-1", base_version: 3, num_examples: 10, train_loss: float(0.5), round: 1 };
const tensor = (name, data, shape = [data.length]) => ({ name, shape, data: Float32Array.from(data) });

test("floats are written as Python's repr writes them", () => {
  const cases = [
    [-7.312715117751976e23, "-7.312715117751976e+23"], [6.045301223363671e-27, "6.045301223363671e-27"],
    [-4.898619485211566, "-4.898619485211566"], [3.031859454455259e19, "3.031859454455259e+19"],
    [-22038238.595773187, "-22038238.595773187"], [1e22, "1e+22"], [1e21, "1e+21"],
    [123456789012345680.0, "1.2345678901234568e+17"], [0.000123, "0.000123"], [5e-5, "5e-05"],
    [1.5e300, "1.5e+300"], [2.2250738585072014e-308, "2.2250738585072014e-308"], [-0, "-0.0"], [2, "2.0"],
  ];
  for (const [x, text] of cases) assert.equal(formatFloat(x), text);
});

test("stochastic rounding is unbiased and within 2s/L of the value", () => {
  const rng = seeded(1);
  const x = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i) * (i % 7));
  const bits = 2;
  const mean = new Float64Array(x.length);
  const draws = 4000;
  for (let d = 0; d < draws; d++) {
    const { scales, codes } = quantize(x, bits, 16, rng);
    const back = dequantize(scales, codes, bits, 16);
    back.forEach((v, i) => {
      const s = scales[Math.floor(i / 16)];
      assert.ok(Math.abs(v - x[i]) < (2 * s) / 3 + 1e-6, `element ${i} off by more than 2s/L`);
      mean[i] += v / draws;
    });
  }
  mean.forEach((m, i) => assert.ok(Math.abs(m - x[i]) < 0.12, `element ${i}: mean ${m} vs ${x[i]}`));
});

test("Gaussian noise has std z*C after clipping", async () => {
  const encoder = new UpdateEncoder({ clip: 1.0, noise: "gaussian", noise_multiplier: 0.5 }, seeded(2));
  const body = await encoder.encode([tensor("w", new Array(20000).fill(0))], META);
  const { data } = decodeMessage(body).tensors.get("w");
  const mean = data.reduce((a, b) => a + b, 0) / data.length;
  const std = Math.sqrt(data.reduce((a, b) => a + (b - mean) ** 2, 0) / data.length);
  assert.ok(Math.abs(mean) < 0.02 && Math.abs(std - 0.5) < 0.02, `mean ${mean}, std ${std}`);
  assert.deepEqual(encoder.release(), { mechanism: "gaussian", z: 0.5 });
});

test("rand-k sends k distinct entries rescaled by n/k", async () => {
  const x = Array.from({ length: 40 }, (_, i) => i + 1);
  const encoder = new UpdateEncoder({ sparsify: "randk", k: 10 }, seeded(3));
  const message = decodeMessage(await encoder.encode([tensor("w", x)], META));
  const sent = [...message.tensors.get("w").data.entries()].filter(([, v]) => v !== 0);
  assert.equal(sent.length, 10);
  for (const [i, v] of sent) assert.equal(v, x[i] * 4);
  assert.equal(message.encodings.w, "sparse");
});

test("zlib payloads round-trip and inflate like zlib", async () => {
  const encoder = new UpdateEncoder({ compress: true }, seeded(4));
  const x = Array.from({ length: 300 }, (_, i) => (i % 5) * 0.25);
  const body = await encoder.encode([tensor("w", x, [3, 100])], META);
  assert.deepEqual([...decodeMessage(body).tensors.get("w").data], x);
  const raw = Uint8Array.from({ length: 5000 }, (_, i) => (i * 7919) % 251 % (i % 3 ? 256 : 4));
  for (const level of [0, 1, 6, 9]) assert.deepEqual(inflateZlib(deflateSync(raw, { level }), raw.length), raw);
  assert.throws(() => inflateZlib(deflateSync(raw), raw.length - 1), /beyond the declared size/);
});

test("error feedback: state survives a reload, rollback undoes a refused upload", async () => {
  const codec = { sparsify: "topk", k: 1, quant_bits: 8, stochastic_rounding: false, chunk: 4, error_feedback: true };
  const first = new UpdateEncoder(codec, seeded(5));
  await first.encode([tensor("w", [0.5, -0.25, 0.125])], META);
  const saved = structuredClone(first.state()); // what IndexedDB stores
  const second = new UpdateEncoder(codec, seeded(5));
  second.load(saved);
  const next = [tensor("w", [0.0, 0.1, 0.0])];
  const meta = { ...META, base_version: 4 };
  const a = await first.encode(next, meta, { staleness: 1 });
  const b = await second.encode(next, meta, { staleness: 1 });
  assert.deepEqual(a, b);
  second.rollback();
  assert.deepEqual(second.state(), saved);
  assert.equal(second.residualBaseVersion, 3);
});

test("the crypto generator gives 53-bit uniforms in [0, 1)", () => {
  const rng = new CryptoRandom();
  let sum = 0;
  for (let i = 0; i < 10000; i++) {
    const u = rng.random();
    assert.ok(u >= 0 && u < 1);
    sum += u;
  }
  assert.ok(Math.abs(sum / 10000 - 0.5) < 0.02);
});
