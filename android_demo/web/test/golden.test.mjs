// The JavaScript codec against the golden vectors of wire format v1 (tests/golden/, FORMAT.md
// section 10), the same files tests/test_wire.py checks the Python reference with:
//
//   encode          run the steps on one encoder: bytes equal message_hex, decoding gives decoded
//   decode          decode message_hex to exactly decoded (numpy RNG / zlib paths)
//   encode_message  build the model message: bytes equal message_hex
//   invalid         reject message_hex with the named reason
//
//   node --test android_demo/web/test/

import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { UpdateEncoder } from "../src/codec/encoder.js";
import { parseJson, plainJson } from "../src/wire/canonical.js";
import { ProtocolError } from "../src/wire/errors.js";
import { decodeMessage, encodeMessage } from "../src/wire/wire.js";

const GOLDEN = process.env.FEDFLEET_GOLDEN_DIR
  ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "tests", "golden");
const files = readdirSync(GOLDEN).filter((f) => f.endsWith(".json")).sort();
// floats stay marked (Float), so 100.0 and 1e+16 in a meta are written back as floats
const vectors = files.map((f) => parseJson(readFileSync(join(GOLDEN, f), "utf8")));

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const unhex = (text) => new Uint8Array(Buffer.from(text, "hex"));

/** Deterministic vectors must not draw: an rng that refuses proves it. */
const noRandomness = { random: () => assert.fail("a deterministic encoder path drew a random number") };

function assertDecoded(message, expected, where) {
  assert.deepEqual([...message.tensors.keys()], expected.map((t) => t.name), `${where}: tensor names`);
  for (const t of expected) {
    const got = message.tensors.get(t.name);
    assert.equal(got.dtype, t.dtype, `${where}/${t.name}: dtype`);
    assert.deepEqual(got.shape, plainJson(t.shape), `${where}/${t.name}: shape`);
    const values = plainJson(t.values);
    assert.equal(got.data.length, values.length, `${where}/${t.name}: size`);
    got.data.forEach((v, i) => {
      // Object.is: exactly the same binary64 value, including the sign of zero
      assert.ok(Object.is(Number(v), values[i]), `${where}/${t.name}[${i}]: ${v} !== ${values[i]}`);
    });
  }
}

const inputsOf = (tensors) => tensors.map((t) => ({ name: t.name, shape: plainJson(t.shape), dtype: t.dtype, data: plainJson(t.values) }));
// state buffers as the phone holds them: Float32Array statistics, BigInt64Array counters
const stateOf = (tensors) => tensors.map((t) => ({ name: t.name, shape: plainJson(t.shape),
  data: t.dtype === "int64" ? BigInt64Array.from(plainJson(t.values), BigInt) : Float32Array.from(plainJson(t.values)) }));

test("the golden directory holds every kind of vector", () => {
  const kinds = new Set(vectors.map((v) => v.type));
  assert.deepEqual([...kinds].sort(), ["decode", "encode", "encode_message", "invalid"]);
  assert.ok(vectors.length >= 40, `only ${vectors.length} vectors in ${GOLDEN}`);
});

for (const v of vectors.filter((x) => x.type === "encode")) {
  test(`encode ${v.name}: byte for byte, then decoded exactly`, async () => {
    const encoder = new UpdateEncoder(plainJson(v.config), noRandomness);
    for (const [i, step] of v.steps.entries()) {
      const state = stateOf(step.state ?? []); // a model's state after training (FORMAT.md section 11)
      const body = await encoder.encode(inputsOf(step.inputs), step.meta, { staleness: plainJson(step.staleness), state });
      assert.equal(hex(body), step.message_hex, `step ${i}: bytes differ from the reference`);
      assertDecoded(decodeMessage(body), step.decoded, `step ${i}`);
    }
  });
}

for (const v of vectors.filter((x) => x.type === "decode")) {
  test(`decode ${v.name}: the reference's bytes decode exactly`, () => {
    for (const [i, step] of v.steps.entries()) {
      const message = decodeMessage(unhex(step.message_hex));
      assert.equal(message.kind, "update");
      assert.deepEqual(message.meta, plainJson(step.meta));
      assertDecoded(message, step.decoded, `step ${i}`);
    }
  });
}

for (const v of vectors.filter((x) => x.type === "encode_message")) {
  test(`encode_message ${v.name}: canonical header and every dtype, byte for byte`, async () => {
    const body = await encodeMessage(v.kind, v.meta, inputsOf(v.inputs));
    assert.equal(hex(body), v.message_hex);
    const back = decodeMessage(body);
    assert.deepEqual(back.meta, plainJson(v.meta));
    assertDecoded(back, v.inputs, v.name);
  });
}

for (const v of vectors.filter((x) => x.type === "invalid")) {
  test(`invalid ${v.name}: rejected as ${v.error}`, () => {
    assert.throws(
      () => decodeMessage(unhex(v.message_hex)),
      (err) => err instanceof ProtocolError && err.reason === v.error,
    );
  });
}
