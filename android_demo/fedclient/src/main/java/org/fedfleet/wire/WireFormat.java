package org.fedfleet.wire;

import java.io.ByteArrayOutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.zip.CRC32;
import java.util.zip.DataFormatException;
import java.util.zip.Deflater;
import java.util.zip.Inflater;

/**
 * Wire format v1 (protocol/FORMAT.md): magic "FFLT", u16 version, u16 flags, u32 header length,
 * canonical JSON header (zlib if flag bit 1), u32 payload length, payload (zlib if flag bit 0),
 * CRC-32 of all before.
 *
 * <p>Everything received is untrusted: {@link #decode} checks each field against hard limits and
 * the receiver's expectations, in FORMAT.md's order, before it allocates or inflates anything,
 * and fails only with {@link WireException}.
 */
public final class WireFormat {
  public static final int VERSION = 1;
  public static final int FLAG_ZLIB = 1;
  /** The header is a zlib stream of the canonical JSON (FORMAT.md section 1). */
  public static final int FLAG_ZLIB_HEADER = 2;
  static final byte[] MAGIC = {'F', 'F', 'L', 'T'};
  static final int MAX_HEADER_BYTES = 1 << 20;
  static final int MAX_TENSORS = 4096;
  static final int MAX_NDIM = 8;
  static final int MAX_NAME_LEN = 256;
  static final long MAX_ELEMENTS = 1L << 28;
  static final Set<String> KINDS = Sets.of("update", "model");

  private WireFormat() {}

  /** A message whose tensors all go dense (the server's model messages, for example). */
  public static byte[] encodeDense(String kind, Map<String, ?> meta, Iterable<Tensor> tensors) {
    List<WireTensor> wire = new ArrayList<>();
    for (Tensor t : tensors) {
      wire.add(WireTensor.dense(t));
    }
    return encode(kind, meta, wire, false);
  }

  /**
   * Frames already-encoded tensors; the header is canonical JSON. {@code compress}: zlib over the
   * payload, and over the header too when that makes it shorter.
   */
  public static byte[] encode(String kind, Map<String, ?> meta, List<WireTensor> tensors, boolean compress) {
    if (!KINDS.contains(kind)) {
      throw new IllegalArgumentException("kind must be 'update' or 'model', got " + kind);
    }
    List<Map<String, Object>> entries = new ArrayList<>();
    ByteArrayOutputStream payload = new ByteArrayOutputStream();
    for (WireTensor t : tensors) {
      int chars = t.name().codePointCount(0, t.name().length());
      if (chars < 1 || chars > MAX_NAME_LEN || t.shape().length > MAX_NDIM) {
        throw new IllegalArgumentException("tensor " + t.name() + ": name must be 1.." + MAX_NAME_LEN
            + " chars, at most " + MAX_NDIM + " dims");
      }
      Map<String, Object> entry = new LinkedHashMap<>();
      entry.put("name", t.name());
      entry.put("dtype", t.dtype().wireName);
      entry.put("shape", t.shape());
      entry.put("encoding", t.encoding());
      entry.putAll(t.fields());
      entry.put("nbytes", t.blob().length);
      entries.add(entry);
      payload.write(t.blob(), 0, t.blob().length);
    }
    byte[] header = CanonicalJson.header(kind, meta, entries).getBytes(StandardCharsets.US_ASCII);
    byte[] body = payload.toByteArray();
    if (!compress) {
      return frame(header, body, 0, VERSION);
    }
    int flags = FLAG_ZLIB;
    byte[] packed = deflate(header);
    if (packed.length < header.length) {
      header = packed;
      flags |= FLAG_ZLIB_HEADER;
    }
    return frame(header, deflate(body), flags, VERSION);
  }

  /** prefix + header + payload length + payload + CRC-32. */
  public static byte[] frame(byte[] header, byte[] payload, int flags, int version) {
    ByteBuffer b = ByteBuffer.allocate(20 + header.length + payload.length).order(ByteOrder.LITTLE_ENDIAN);
    b.put(MAGIC).putShort((short) version).putShort((short) flags).putInt(header.length).put(header);
    b.putInt(payload.length).put(payload);
    CRC32 crc = new CRC32();
    crc.update(b.array(), 0, b.position());
    b.putInt((int) crc.getValue());
    return b.array();
  }

  /**
   * Parses and validates a message. With {@code expected} (non-null), the tensor names, shapes
   * and dtypes must equal it exactly ({@code shape_mismatch}), checked before any payload work.
   * {@code maxBytes} <= 0 means no size limit beyond the format's own.
   */
  public static Message decode(byte[] data, Map<String, TensorSpec> expected, long maxBytes) throws WireException {
    if (maxBytes > 0 && data.length > maxBytes) {
      throw WireException.malformed("message of " + data.length + " bytes exceeds the limit of " + maxBytes);
    }
    if (data.length < 20) {
      throw WireException.malformed("message of " + data.length + " bytes is shorter than the fixed prefix");
    }
    ByteBuffer b = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
    if (!Arrays.equals(Arrays.copyOf(data, 4), MAGIC)) {
      throw WireException.malformed("bad magic, expected FFLT");
    }
    int version = b.getShort(4) & 0xffff;
    int flags = b.getShort(6) & 0xffff;
    long headerLen = b.getInt(8) & 0xffffffffL;
    if (version != VERSION) {
      throw new WireException(WireException.Reason.UNSUPPORTED_VERSION,
          "format version " + version + " is not supported (this side speaks " + VERSION + ")");
    }
    if ((flags & ~(FLAG_ZLIB | FLAG_ZLIB_HEADER)) != 0) {
      throw WireException.malformed(String.format("unknown flag bits 0x%04x", flags));
    }
    CRC32 crc = new CRC32();
    crc.update(data, 0, data.length - 4);
    if ((int) crc.getValue() != b.getInt(data.length - 4)) {
      throw new WireException(WireException.Reason.CHECKSUM, "CRC-32 does not match: the message was truncated or corrupted");
    }
    if (headerLen > MAX_HEADER_BYTES || 12 + headerLen + 8 > data.length) {
      throw WireException.malformed("header length " + headerLen + " does not fit the message");
    }
    byte[] rawHeader = (flags & FLAG_ZLIB_HEADER) != 0
        ? inflate(data, 12, (int) headerLen, MAX_HEADER_BYTES, "header")
        : Arrays.copyOfRange(data, 12, 12 + (int) headerLen);
    Map<String, Object> header = Header.parse(rawHeader);
    int pos = 12 + (int) headerLen;
    long payloadLen = b.getInt(pos) & 0xffffffffL;
    pos += 4;
    if (pos + payloadLen + 4 != data.length) {
      throw WireException.malformed("payload length " + payloadLen + " disagrees with the message size");
    }
    List<Encodings.Entry> entries = Header.entries((List<?>) header.get("tensors"));
    if (expected != null) {
      Header.checkAgainst(entries, expected);
    }
    long declared = 0;
    for (Encodings.Entry e : entries) {
      declared += e.nbytes();
    }
    byte[] payload;
    int off;
    if ((flags & FLAG_ZLIB) != 0) {
      payload = inflate(data, pos, (int) payloadLen, declared, "payload");
      off = 0;
    } else {
      payload = data;
      off = pos;
    }
    long available = (flags & FLAG_ZLIB) != 0 ? payload.length : payloadLen;
    if (available != declared) {
      throw WireException.malformed("payload holds " + available + " bytes but tensors declare " + declared);
    }
    Map<String, Tensor> tensors = new LinkedHashMap<>();
    Map<String, String> encodings = new LinkedHashMap<>();
    for (Encodings.Entry e : entries) {
      try {
        tensors.put(e.name(), Encodings.decode(e, payload, off));
      } catch (WireException ex) {
        throw ex.in(e.name());
      }
      encodings.put(e.name(), e.encoding());
      off += (int) e.nbytes();
    }
    @SuppressWarnings("unchecked")
    Map<String, Object> meta = (Map<String, Object>) header.get("meta");
    return new Message((String) header.get("kind"), meta, tensors, data.length, encodings);
  }

  private static byte[] deflate(byte[] data) {
    Deflater d = new Deflater(6); // the reference's level; only the inflated bytes are normative
    try {
      d.setInput(data);
      d.finish();
      ByteArrayOutputStream out = new ByteArrayOutputStream();
      byte[] buf = new byte[8192];
      while (!d.finished()) {
        out.write(buf, 0, d.deflate(buf));
      }
      return out.toByteArray();
    } finally {
      d.end();
    }
  }

  /**
   * Inflates at most {@code limit + 1} bytes, so a compression bomb stops early; the stream must
   * end exactly at the section's end ({@code what}: "payload" or "header"). The payload's size is
   * then compared with the declared one; a header may be shorter than its limit.
   */
  private static byte[] inflate(byte[] data, int off, int len, long limit, String what) throws WireException {
    Inflater inf = new Inflater();
    try {
      inf.setInput(data, off, len);
      byte[] out = new byte[(int) Math.min(limit + 1, Integer.MAX_VALUE - 8)];
      int n = 0;
      while (n < out.length && !inf.finished()) {
        int k = inf.inflate(out, n, out.length - n);
        if (k == 0 && (inf.needsInput() || inf.needsDictionary())) {
          break;
        }
        n += k;
      }
      if (n > limit || !inf.finished() || inf.getRemaining() > 0) {
        throw WireException.malformed("payload".equals(what)
            ? "compressed payload does not inflate to the declared size"
            : "compressed header is not one zlib stream of at most " + limit + " bytes");
      }
      return Arrays.copyOf(out, n);
    } catch (DataFormatException e) {
      throw WireException.malformed(what + " does not inflate: " + e.getMessage());
    } finally {
      inf.end();
    }
  }
}
