// A strict zlib (RFC 1950) / DEFLATE (RFC 1951) decoder for compressed payloads (FORMAT.md
// section 1, "Compression"). It is synchronous and does exactly what the reference decoder
// asks of zlib: inflate at most `limit` bytes (a compression bomb stops there), require the
// end of the stream and a matching Adler-32, and refuse bytes after the stream. The
// browser's DecompressionStream cannot promise all of that the same way in every engine.
// Encoding uses the platform's CompressionStream (compressed bytes are not normative).

import { MalformedMessage } from "./errors.js";

const LENGTH_BASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
const LENGTH_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073,
  4097, 6145, 8193, 12289, 16385, 24577];
const DIST_EXTRA = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
const CODE_LENGTH_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

const bad = (what) => new MalformedMessage(`payload does not inflate: ${what}`);

/**
 * Canonical Huffman code from code lengths: counts per length and symbols in code order.
 * `incomplete`: "never" (code lengths), "single" (a literal or distance code may hold one
 * code only, as zlib allows) or "any" (the fixed distance code: 30 of 32 codes of length 5).
 */
function huffman(lengths, incomplete = "never") {
  const counts = new Uint16Array(16);
  for (const len of lengths) counts[len]++;
  counts[0] = 0;
  let left = 1;
  for (let len = 1; len < 16; len++) {
    left = 2 * left - counts[len];
    if (left < 0) throw bad("over-subscribed Huffman code");
  }
  const used = lengths.reduce((n, len) => n + (len > 0), 0);
  if (left > 0 && !(incomplete === "any" || (incomplete === "single" && used <= 1))) throw bad("incomplete Huffman code");
  const offsets = new Uint16Array(16);
  for (let len = 1; len < 15; len++) offsets[len + 1] = offsets[len] + counts[len];
  const symbols = new Uint16Array(lengths.length);
  lengths.forEach((len, sym) => {
    if (len) symbols[offsets[len]++] = sym;
  });
  return { counts, symbols };
}

const FIXED_LIT = huffman([...Array(288)].map((_, i) => (i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8)));
const FIXED_DIST = huffman(new Array(30).fill(5), "any");

class Inflater {
  constructor(data, start, limit) {
    this.data = data;
    this.pos = start;
    this.bitBuf = 0;
    this.bitCount = 0;
    this.limit = limit;
    this.out = new Uint8Array(Math.min(limit, Math.max(1024, 4 * data.length)));
    this.size = 0;
  }

  bits(n) {
    while (this.bitCount < n) {
      if (this.pos >= this.data.length) throw bad("unexpected end of stream");
      this.bitBuf |= this.data[this.pos++] << this.bitCount;
      this.bitCount += 8;
    }
    const v = this.bitBuf & ((1 << n) - 1);
    this.bitBuf >>>= n;
    this.bitCount -= n;
    return v;
  }

  symbol({ counts, symbols }) {
    let code = 0;
    let first = 0;
    let index = 0;
    for (let len = 1; len < 16; len++) {
      code |= this.bits(1);
      const count = counts[len];
      if (code - first < count) return symbols[index + code - first];
      index += count;
      first = (first + count) << 1;
      code <<= 1;
    }
    throw bad("invalid Huffman code");
  }

  push(byte) {
    if (this.size >= this.limit) throw new MalformedMessage("compressed payload inflates beyond the declared size");
    if (this.size === this.out.length) {
      const grown = new Uint8Array(Math.min(this.limit, 2 * this.out.length));
      grown.set(this.out);
      this.out = grown;
    }
    this.out[this.size++] = byte;
  }

  stored() {
    this.bitBuf = 0; // skip to a byte boundary
    this.bitCount = 0;
    if (this.pos + 4 > this.data.length) throw bad("unexpected end of stream");
    const d = this.data;
    const len = d[this.pos] | (d[this.pos + 1] << 8);
    const nlen = d[this.pos + 2] | (d[this.pos + 3] << 8);
    if ((len ^ 0xffff) !== nlen) throw bad("stored block length check");
    this.pos += 4;
    if (this.pos + len > d.length) throw bad("unexpected end of stream");
    for (let i = 0; i < len; i++) this.push(d[this.pos++]);
  }

  dynamicTrees() {
    const hlit = this.bits(5) + 257;
    const hdist = this.bits(5) + 1;
    const hclen = this.bits(4) + 4;
    if (hlit > 286 || hdist > 30) throw bad("too many length or distance symbols");
    const clen = new Array(19).fill(0);
    for (let i = 0; i < hclen; i++) clen[CODE_LENGTH_ORDER[i]] = this.bits(3);
    const codeTree = huffman(clen);
    const lengths = [];
    while (lengths.length < hlit + hdist) {
      const sym = this.symbol(codeTree);
      if (sym < 16) lengths.push(sym);
      else {
        let repeat;
        let value = 0;
        if (sym === 16) {
          if (!lengths.length) throw bad("repeat with no previous length");
          value = lengths[lengths.length - 1];
          repeat = 3 + this.bits(2);
        } else repeat = sym === 17 ? 3 + this.bits(3) : 11 + this.bits(7);
        if (lengths.length + repeat > hlit + hdist) throw bad("too many code lengths");
        for (let i = 0; i < repeat; i++) lengths.push(value);
      }
    }
    if (!lengths[256]) throw bad("no end-of-block code");
    return [huffman(lengths.slice(0, hlit), "single"), huffman(lengths.slice(hlit), "single")];
  }

  huffmanBlock(lit, dist) {
    for (;;) {
      const sym = this.symbol(lit);
      if (sym < 256) this.push(sym);
      else if (sym === 256) return;
      else {
        const i = sym - 257;
        if (i >= 29) throw bad("invalid length symbol");
        const length = LENGTH_BASE[i] + this.bits(LENGTH_EXTRA[i]);
        const d = this.symbol(dist);
        if (d >= 30) throw bad("invalid distance symbol");
        const distance = DIST_BASE[d] + this.bits(DIST_EXTRA[d]);
        if (distance > this.size) throw bad("distance too far back");
        for (let k = 0; k < length; k++) this.push(this.out[this.size - distance]);
      }
    }
  }

  run() {
    let last = 0;
    while (!last) {
      last = this.bits(1);
      const type = this.bits(2);
      if (type === 0) this.stored();
      else if (type === 1) this.huffmanBlock(FIXED_LIT, FIXED_DIST);
      else if (type === 2) this.huffmanBlock(...this.dynamicTrees());
      else throw bad("invalid block type");
    }
    return this.pos; // the stream ends at a byte boundary: the partial byte is padding
  }
}

function adler32(bytes, size) {
  let a = 1;
  let b = 0;
  for (let i = 0; i < size; i++) {
    a = (a + bytes[i]) % 65521;
    b = (b + a) % 65521;
  }
  return ((b << 16) | a) >>> 0;
}

/** Inflate one zlib stream that must fill `data` exactly and hold at most `limit` bytes. */
export function inflateZlib(data, limit) {
  if (data.length < 2) throw bad("unexpected end of stream");
  const cmf = data[0];
  const flg = data[1];
  if ((cmf & 0x0f) !== 8 || cmf >> 4 > 7 || ((cmf << 8) | flg) % 31 !== 0) throw bad("incorrect header check");
  if (flg & 0x20) throw bad("preset dictionary");
  const inflater = new Inflater(data, 2, limit);
  const end = inflater.run();
  if (end + 4 > data.length) throw bad("unexpected end of stream");
  const check = ((data[end] << 24) | (data[end + 1] << 16) | (data[end + 2] << 8) | data[end + 3]) >>> 0;
  if (check !== adler32(inflater.out, inflater.size)) throw bad("incorrect data check");
  if (end + 4 !== data.length) throw new MalformedMessage("bytes follow the end of the compressed payload");
  return inflater.out.subarray(0, inflater.size);
}

/** zlib-compress `bytes` with the platform's CompressionStream ("deflate" is RFC 1950). */
export async function deflateZlib(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
