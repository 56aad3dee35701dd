// Canonical JSON for the message header, and its strict parser (protocol/FORMAT.md section 2).
//
// Every encoder must write the same header bytes for the same message, so the form is pinned
// down: no whitespace; ASCII only (\uXXXX escapes in lowercase hex, surrogate pairs above
// U+FFFF); keys of `meta` sorted by code point at every depth; tensor entries in the order
// their builder gives; integers in +-(2^53 - 1) in plain decimal; floats as Python's repr
// writes them.
//
// JavaScript has one number type, so a value meant as a float whose value is integral (2.0,
// 1e16, -0.0) is marked with `float(x)`; any other non-integer number is written as a float.

import { MalformedMessage } from "./errors.js";

export const MAX_SAFE_INT = Number.MAX_SAFE_INTEGER; // 2^53 - 1: beyond it integers lose precision

/** A number the producer means as a float: written "2.0", not "2". */
export class Float {
  constructor(value) {
    this.value = Number(value);
  }

  valueOf() {
    return this.value;
  }
}

export const float = (x) => new Float(x);

/** Python repr(float) for a finite binary64 (FORMAT.md section 2, rule 6). */
export function formatFloat(x) {
  if (!Number.isFinite(x)) throw new RangeError(`${x} is not a finite number`);
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  // toExponential() without an argument gives the shortest round-trip digits (ECMA-262 Number::toString)
  const [mantissa, exp] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", "");
  const e = Number(exp);
  const sign = x < 0 ? "-" : "";
  if (e >= -4 && e < 16) {
    if (e >= 0) {
      const whole = digits.slice(0, e + 1).padEnd(e + 1, "0");
      return `${sign}${whole}.${digits.slice(e + 1) || "0"}`;
    }
    return `${sign}0.${"0".repeat(-e - 1)}${digits}`;
  }
  const frac = digits.length > 1 ? `.${digits.slice(1)}` : "";
  return `${sign}${digits[0]}${frac}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
}

const ESCAPES = { '"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t" };

export function formatString(s) {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const code = s.charCodeAt(i); // UTF-16 code units: astral characters come out as surrogate pairs
    if (ESCAPES[ch] !== undefined) out += ESCAPES[ch];
    else if (code >= 0x20 && code <= 0x7e) out += ch;
    else out += `\\u${code.toString(16).padStart(4, "0")}`;
  }
  return `${out}"`;
}

function formatInteger(n, path) {
  if (typeof n === "bigint" ? n > BigInt(MAX_SAFE_INT) || n < -BigInt(MAX_SAFE_INT) : Math.abs(n) > MAX_SAFE_INT) {
    throw new RangeError(`${path}: integer ${n} is outside +-(2**53 - 1)`);
  }
  return String(n);
}

/** Compare strings by Unicode code point (Python's sort order), not by UTF-16 unit. */
export function compareCodePoints(a, b) {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

/** Canonical JSON of a value; objects get their keys sorted (the rule for `meta`). */
export function canonicalValue(v, path = "meta") {
  if (v === null) return "null";
  if (v === true || v === false) return String(v);
  if (v instanceof Float) return formatFloat(v.value);
  if (typeof v === "bigint") return formatInteger(v, path);
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw new RangeError(`${path}: ${v} is not a finite number`);
    return Number.isInteger(v) && !Object.is(v, -0) ? formatInteger(v, path) : formatFloat(v);
  }
  if (typeof v === "string") return formatString(v);
  if (Array.isArray(v)) return `[${v.map((x, i) => canonicalValue(x, `${path}[${i}]`)).join(",")}]`;
  if (typeof v === "object") {
    const keys = Object.keys(v).sort(compareCodePoints);
    return `{${keys.map((k) => `${formatString(k)}:${canonicalValue(v[k], `${path}.${k}`)}`).join(",")}}`;
  }
  throw new TypeError(`${path}: ${typeof v} cannot go into the JSON header`);
}

/** One tensor entry, keys in the order given (name, dtype, shape, encoding, own keys, nbytes). */
function entryJson(entry) {
  return `{${Object.entries(entry).map(([k, v]) => `${formatString(k)}:${canonicalValue(v, k)}`).join(",")}}`;
}

/** The header bytes: {"kind":K,"meta":M,"tensors":[...]} in canonical form (ASCII). */
export function canonicalHeader(kind, meta, entries) {
  const text = `{"kind":${formatString(kind)},"meta":${canonicalValue(meta)},"tensors":[${entries.map(entryJson).join(",")}]}`;
  return new TextEncoder().encode(text);
}

// --- strict parser --------------------------------------------------------------------------

/**
 * Parse JSON text strictly (RFC 8259): duplicate keys in an object are an error, and so is
 * anything after the value. Numbers written with a fraction or an exponent come back as
 * `Float` (so a decoder can tell `4` from `4.0`); objects have no prototype.
 */
export function parseJson(text) {
  let pos = 0;
  const fail = (what) => {
    throw new MalformedMessage(`header is not valid JSON: ${what} at offset ${pos}`);
  };
  const ws = () => {
    while (pos < text.length && " \t\n\r".includes(text[pos])) pos++;
  };
  const literal = (word, value) => {
    if (text.startsWith(word, pos)) {
      pos += word.length;
      return value;
    }
    return fail("unexpected token");
  };
  const NUMBER = /-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/y;
  const number = () => {
    NUMBER.lastIndex = pos;
    const m = NUMBER.exec(text);
    if (!m) fail("bad number");
    pos = NUMBER.lastIndex;
    const value = Number(m[0]);
    return m[1] !== undefined || m[2] !== undefined ? new Float(value) : value;
  };
  const string = () => {
    pos++; // opening quote
    let out = "";
    for (;;) {
      if (pos >= text.length) fail("unterminated string");
      const ch = text[pos++];
      if (ch === '"') return out;
      if (ch < " ") fail("control character in string");
      if (ch !== "\\") {
        out += ch;
        continue;
      }
      const esc = text[pos++];
      const simple = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" }[esc];
      if (simple !== undefined) out += simple;
      else if (esc === "u" && /^[0-9a-fA-F]{4}$/.test(text.slice(pos, pos + 4))) {
        out += String.fromCharCode(parseInt(text.slice(pos, pos + 4), 16));
        pos += 4;
      } else fail("bad escape");
    }
  };
  const value = () => {
    ws();
    const ch = text[pos];
    if (ch === "{") return object();
    if (ch === "[") return array();
    if (ch === '"') return string();
    if (ch === "t") return literal("true", true);
    if (ch === "f") return literal("false", false);
    if (ch === "n") return literal("null", null);
    return number();
  };
  const array = () => {
    pos++;
    const out = [];
    ws();
    if (text[pos] === "]") {
      pos++;
      return out;
    }
    for (;;) {
      out.push(value());
      ws();
      const ch = text[pos++];
      if (ch === "]") return out;
      if (ch !== ",") fail("expected , or ]");
    }
  };
  const object = () => {
    pos++;
    const out = Object.create(null);
    ws();
    if (text[pos] === "}") {
      pos++;
      return out;
    }
    for (;;) {
      ws();
      if (text[pos] !== '"') fail("expected a key");
      const key = string();
      if (Object.prototype.hasOwnProperty.call(out, key)) {
        throw new MalformedMessage(`header repeats the key ${JSON.stringify(key)} within one object`);
      }
      ws();
      if (text[pos++] !== ":") fail("expected :");
      out[key] = value();
      ws();
      const ch = text[pos++];
      if (ch === "}") return out;
      if (ch !== ",") fail("expected , or }");
    }
  };
  let result;
  try {
    result = value();
  } catch (err) {
    if (err instanceof RangeError) fail("nesting too deep"); // stack overflow on hostile input
    throw err;
  }
  ws();
  if (pos !== text.length) fail("trailing data");
  return result;
}

/** Replace `Float` markers by plain numbers, recursively (what an application reads). */
export function plainJson(v) {
  if (v instanceof Float) return v.value;
  if (Array.isArray(v)) return v.map(plainJson);
  if (v !== null && typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v)) {
      // defineProperty: a key named "__proto__" stays a plain key
      Object.defineProperty(out, k, { value: plainJson(v[k]), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }
  return v;
}
