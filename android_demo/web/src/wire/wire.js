// Wire format v1, the container (FORMAT.md section 1), as protocol/wire.py:
//
//   magic "FFLT" | version u16 | flags u16 | header_len u32 | header (canonical JSON, zlib if
//   flag bit 1) | payload_len u32 | payload (tensor blobs in header order, zlib if flag bit 0) | crc32 u32
//
// Everything received is untrusted: decodeMessage checks each field against hard limits and
// the receiver's expectations before it allocates or inflates, and throws only ProtocolErrors,
// in the order of FORMAT.md section 8 (size, magic, version, flags, CRC, header, entries,
// model match, payload).

import { canonicalHeader, parseJson, plainJson, Float } from "./canonical.js";
import { crc32 } from "./crc32.js";
import { ENCODINGS, dtypeOf, encodeDense } from "./encodings.js";
import {
  ChecksumMismatch, MalformedMessage, ProtocolError, ShapeMismatch, UnsupportedEncoding, UnsupportedVersion,
} from "./errors.js";
import { deflateZlib, inflateZlib } from "./inflate.js";

export const MAGIC = [0x46, 0x46, 0x4c, 0x54]; // "FFLT"
export const FORMAT_VERSION = 1;
export const FLAG_ZLIB = 1;
export const FLAG_ZLIB_HEADER = 2; // the header is a zlib stream of the canonical JSON
export const MAX_HEADER_BYTES = 1 << 20;
export const MAX_TENSORS = 4096;
export const MAX_NDIM = 8;
export const MAX_NAME_LEN = 256;
export const MAX_ELEMENTS = 2 ** 28;
const KINDS = ["update", "model"];
const COMMON_KEYS = ["name", "dtype", "shape", "encoding", "nbytes"];
const isInt = (v) => typeof v === "number" && Number.isInteger(v);
const product = (shape) => shape.reduce((a, b) => a * b, 1);

/** prefix + header + payload_len + payload + CRC-32 around given bytes (payload may come in parts). */
export function frame(header, parts, { flags = 0, version = FORMAT_VERSION } = {}) {
  const payloadLen = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(20 + header.length + payloadLen);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  view.setUint16(4, version, true);
  view.setUint16(6, flags, true);
  view.setUint32(8, header.length, true);
  out.set(header, 12);
  view.setUint32(12 + header.length, payloadLen, true);
  let pos = 16 + header.length;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  view.setUint32(pos, crc32(out.subarray(0, pos)), true);
  return out;
}

/**
 * Frame already-encoded tensors: each { name, dtype, shape, encoding, fields, blob } with
 * `fields` the encoding's own header keys in canonical order. Async only for zlib.
 * `compress`: zlib over the payload, and over the header too when that makes it shorter.
 */
export async function encodeWire(kind, meta, tensors, { compress = false } = {}) {
  if (!KINDS.includes(kind)) throw new RangeError(`kind must be one of ${KINDS}`);
  const entries = tensors.map((t) => {
    if (typeof t.name !== "string" || !t.name.length || t.name.length > MAX_NAME_LEN || t.shape.length > MAX_NDIM) {
      throw new RangeError(`tensor ${t.name}: name must be 1..${MAX_NAME_LEN} chars, at most ${MAX_NDIM} dims`);
    }
    return { name: t.name, dtype: t.dtype, shape: [...t.shape], encoding: t.encoding, ...t.fields, nbytes: t.blob.length };
  });
  let header = canonicalHeader(kind, meta, entries);
  const blobs = tensors.map((t) => t.blob);
  if (!compress) return frame(header, blobs);
  const joined = new Uint8Array(blobs.reduce((n, b) => n + b.length, 0));
  blobs.reduce((pos, b) => (joined.set(b, pos), pos + b.length), 0);
  let flags = FLAG_ZLIB;
  const packed = await deflateZlib(header);
  if (packed.length < header.length) {
    header = packed;
    flags |= FLAG_ZLIB_HEADER;
  }
  return frame(header, [await deflateZlib(joined)], { flags });
}

/** A message of dense tensors, each { name, dtype, shape, data }. */
export function encodeMessage(kind, meta, tensors, options) {
  const wire = tensors.map((t) => ({ ...t, encoding: "dense", fields: {}, blob: encodeDense(t.dtype, t.data) }));
  return encodeWire(kind, meta, wire, options);
}

function checkEntry(raw, seen) {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw) || raw instanceof Float) {
    throw new MalformedMessage("tensor entry must be an object");
  }
  const { name, shape, nbytes, encoding: encName } = raw;
  if (typeof name !== "string" || !name.length || name.length > MAX_NAME_LEN) {
    throw new MalformedMessage(`tensor name must be a string of 1..${MAX_NAME_LEN} characters`);
  }
  if (seen.has(name)) throw new MalformedMessage(`tensor "${name}" appears twice`);
  seen.add(name);
  if (!Array.isArray(shape) || shape.length > MAX_NDIM || !shape.every((d) => isInt(d) && d >= 0 && d <= MAX_ELEMENTS)) {
    throw new MalformedMessage(`tensor "${name}": shape must be a list of at most ${MAX_NDIM} non-negative ints`);
  }
  if (!isInt(nbytes) || nbytes < 0) throw new MalformedMessage(`tensor "${name}": nbytes must be a non-negative int`);
  const encoding = typeof encName === "string" && Object.hasOwn(ENCODINGS, encName) ? ENCODINGS[encName] : null;
  if (encoding === null) throw new UnsupportedEncoding(`tensor "${name}": unknown encoding ${JSON.stringify(encName)}`);
  const fields = {};
  for (const k of Object.keys(raw)) if (!COMMON_KEYS.includes(k)) fields[k] = raw[k];
  if (product(shape) > MAX_ELEMENTS) throw new MalformedMessage(`tensor "${name}" declares more than ${MAX_ELEMENTS} elements`);
  let lo;
  let hi;
  try {
    dtypeOf(raw.dtype);
    [lo, hi] = encoding.check(fields, shape, raw.dtype);
  } catch (err) {
    if (err instanceof ProtocolError) err.message = `tensor "${name}": ${err.message}`;
    throw err;
  }
  if (nbytes < lo || nbytes > hi) throw new MalformedMessage(`tensor "${name}": nbytes ${nbytes} is outside [${lo}, ${hi}]`);
  return { name, shape, dtype: raw.dtype, encName, encoding, fields, nbytes };
}

function parseHeader(bytes) {
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    throw new MalformedMessage("header is not valid UTF-8");
  }
  const header = parseJson(text);
  const keys = header && typeof header === "object" && !Array.isArray(header) ? Object.keys(header).sort() : null;
  if (keys === null || header instanceof Float || keys.join() !== "kind,meta,tensors") {
    throw new MalformedMessage('header must be an object with exactly the keys ["kind", "meta", "tensors"]');
  }
  if (!KINDS.includes(header.kind)) throw new MalformedMessage(`header.kind must be one of ${KINDS}`);
  const meta = header.meta;
  if (meta === null || typeof meta !== "object" || Array.isArray(meta) || meta instanceof Float) {
    throw new MalformedMessage("header.meta must be an object");
  }
  if (!Array.isArray(header.tensors) || header.tensors.length > MAX_TENSORS) {
    throw new MalformedMessage(`header.tensors must be a list of at most ${MAX_TENSORS} entries`);
  }
  return header;
}

/** `expected`: Map or object name -> { shape, dtype }; names, shapes, dtypes must match exactly. */
export function checkAgainst(entries, expected) {
  const want = expected instanceof Map ? expected : new Map(Object.entries(expected));
  const got = new Map(entries.map((e) => [e.name, e]));
  const missing = [...want.keys()].filter((n) => !got.has(n)).sort();
  const extra = [...got.keys()].filter((n) => !want.has(n)).sort();
  if (missing.length || extra.length) {
    throw new ShapeMismatch(`tensor names differ from the model: missing [${missing}], unexpected [${extra}]`);
  }
  for (const [name, spec] of want) {
    const e = got.get(name);
    if (e.shape.join() !== spec.shape.join() || e.shape.length !== spec.shape.length || e.dtype !== (spec.dtype ?? "float32")) {
      throw new ShapeMismatch(`tensor "${name}": got ${e.dtype}[${e.shape}], expected ${spec.dtype}[${spec.shape}]`);
    }
  }
}

/**
 * Parse and validate a message (a Uint8Array). Returns { kind, meta, tensors: Map name ->
 * { dtype, shape, data }, wireBytes, encodings }.
 */
export function decodeMessage(data, { expected = null, maxBytes = null } = {}) {
  if (maxBytes !== null && data.length > maxBytes) {
    throw new MalformedMessage(`message of ${data.length} bytes exceeds the limit of ${maxBytes}`);
  }
  if (data.length < 20) throw new MalformedMessage(`message of ${data.length} bytes is shorter than the fixed prefix`);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (MAGIC.some((b, i) => data[i] !== b)) throw new MalformedMessage("bad magic, expected FFLT");
  const version = view.getUint16(4, true);
  if (version !== FORMAT_VERSION) throw new UnsupportedVersion(`format version ${version} is not supported (this side speaks 1)`);
  const flags = view.getUint16(6, true);
  if (flags & ~(FLAG_ZLIB | FLAG_ZLIB_HEADER)) throw new MalformedMessage(`unknown flag bits 0x${flags.toString(16)}`);
  if (crc32(data.subarray(0, data.length - 4)) !== view.getUint32(data.length - 4, true)) {
    throw new ChecksumMismatch("CRC-32 does not match: the message was truncated or corrupted");
  }
  const headerLen = view.getUint32(8, true);
  if (headerLen > MAX_HEADER_BYTES || 12 + headerLen + 8 > data.length) {
    throw new MalformedMessage(`header length ${headerLen} does not fit the message`);
  }
  let rawHeader = data.subarray(12, 12 + headerLen);
  if (flags & FLAG_ZLIB_HEADER) {
    try {
      rawHeader = inflateZlib(rawHeader, MAX_HEADER_BYTES); // at most 1 MiB, as a plain header
    } catch (err) {
      if (err instanceof MalformedMessage) err.message = `compressed header: ${err.message}`;
      throw err;
    }
  }
  const header = parseHeader(rawHeader);
  let pos = 12 + headerLen;
  const payloadLen = view.getUint32(pos, true);
  pos += 4;
  if (pos + payloadLen + 4 !== data.length) throw new MalformedMessage(`payload length ${payloadLen} disagrees with the message size`);
  const seen = new Set();
  const entries = header.tensors.map((e) => checkEntry(e, seen));
  const total = entries.reduce((n, e) => n + product(e.shape), 0);
  if (total > MAX_ELEMENTS) throw new MalformedMessage(`message declares ${total} elements, over the limit of ${MAX_ELEMENTS}`);
  if (expected !== null) checkAgainst(entries, expected);
  let payload = data.subarray(pos, pos + payloadLen);
  const declared = entries.reduce((n, e) => n + e.nbytes, 0);
  if (flags & FLAG_ZLIB) payload = inflateZlib(payload, declared);
  if (payload.length !== declared) throw new MalformedMessage(`payload holds ${payload.length} bytes but tensors declare ${declared}`);
  const tensors = new Map();
  let offset = 0;
  for (const e of entries) {
    const blob = payload.subarray(offset, offset + e.nbytes);
    offset += e.nbytes;
    try {
      tensors.set(e.name, { dtype: e.dtype, shape: e.shape, data: e.encoding.decode(e.fields, blob, e.shape, e.dtype) });
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw new MalformedMessage(`tensor "${e.name}": ${err.message}`);
      err.message = `tensor "${e.name}": ${err.message}`;
      throw err;
    }
  }
  const encodings = Object.fromEntries(entries.map((e) => [e.name, e.encName]));
  return { kind: header.kind, meta: plainJson(header.meta), tensors, wireBytes: data.length, encodings };
}
