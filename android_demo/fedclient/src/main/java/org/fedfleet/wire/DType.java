package org.fedfleet.wire;

/** The tensor dtypes of wire format v1 (FORMAT.md section 3), all little-endian. */
public enum DType {
  FLOAT32("float32", 4, true),
  FLOAT64("float64", 8, true),
  FLOAT16("float16", 2, true),
  INT32("int32", 4, false),
  INT64("int64", 8, false);

  public final String wireName;
  public final int itemSize;
  public final boolean isFloat;

  DType(String wireName, int itemSize, boolean isFloat) {
    this.wireName = wireName;
    this.itemSize = itemSize;
    this.isFloat = isFloat;
  }

  /** The dtype named {@code name} on the wire, or a {@code malformed} error. */
  public static DType fromWire(Object name) throws WireException {
    for (DType d : values()) {
      if (d.wireName.equals(name)) {
        return d;
      }
    }
    throw WireException.malformed("unknown dtype " + name);
  }
}
