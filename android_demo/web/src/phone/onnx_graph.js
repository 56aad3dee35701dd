// model.onnx keeps the trainable weights as initializers that are also graph inputs, i.e.
// defaults a caller may override (export/onnx_export.py). onnxruntime (Python) accepts such
// overrides; onnxruntime-web does not list them among a session's inputs and refuses to be
// fed them. So, after the file's sha256 was verified, the phone drops those initializers from
// the graph: the weights become plain inputs, fed from the current model on every call.
//
// This edits the protobuf wire format directly (ModelProto.graph = field 7, GraphProto.
// initializer = field 5, TensorProto.name = field 8), copying every other byte unchanged.

const LEN = 2; // wire type of length-delimited fields

function varint(buf, pos) {
  let value = 0;
  for (let shift = 0; ; shift += 7) {
    if (pos >= buf.length || shift > 49) throw new Error("model.onnx: bad protobuf varint");
    const b = buf[pos++];
    value += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) return [value, pos];
  }
}

function encodeVarint(n) {
  const out = [];
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
  return Uint8Array.from(out);
}

/** Every field of a message: { field, wire, start, keyEnd, end, body: [start, end) of a LEN payload }. */
function* fields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    const start = pos;
    let key;
    [key, pos] = varint(buf, pos);
    const keyEnd = pos;
    const wire = key % 8;
    let body = null;
    if (wire === 0) [, pos] = varint(buf, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === LEN) {
      let len;
      [len, pos] = varint(buf, pos);
      body = [pos, pos + len];
      pos += len;
    } else throw new Error(`model.onnx: unsupported protobuf wire type ${wire}`);
    if (pos > buf.length) throw new Error("model.onnx: truncated protobuf");
    yield { field: Math.floor(key / 8), wire, start, keyEnd, end: pos, body };
  }
}

function tensorName(tensor) {
  for (const f of fields(tensor)) if (f.field === 8 && f.wire === LEN) return new TextDecoder().decode(tensor.subarray(...f.body));
  return null;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((pos, p) => (out.set(p, pos), pos + p.length), 0);
  return out;
}

/** `model` (ONNX bytes) without the initializers named in `names`; all of them must be there. */
export function dropInitializers(model, names) {
  const wanted = new Set(names);
  const dropped = new Set();
  const parts = [];
  for (const f of fields(model)) {
    if (f.field !== 7 || f.wire !== LEN) {
      parts.push(model.subarray(f.start, f.end));
      continue;
    }
    const graph = model.subarray(...f.body);
    const kept = [];
    for (const g of fields(graph)) {
      const name = g.field === 5 && g.wire === LEN ? tensorName(graph.subarray(...g.body)) : null;
      if (name !== null && wanted.has(name)) dropped.add(name);
      else kept.push(graph.subarray(g.start, g.end));
    }
    const body = concat(kept);
    parts.push(model.subarray(f.start, f.keyEnd), encodeVarint(body.length), body);
  }
  const missing = [...wanted].filter((n) => !dropped.has(n));
  if (missing.length) throw new Error(`model.onnx has no initializer for ${missing}`);
  return concat(parts);
}
