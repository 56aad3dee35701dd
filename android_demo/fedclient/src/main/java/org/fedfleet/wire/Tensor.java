package org.fedfleet.wire;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Arrays;

/**
 * A named tensor as the wire carries it densely: dtype, shape and little-endian C-order bytes.
 * Immutable; the accessors copy. Every lossy encoding decodes to a float32 {@code Tensor}.
 */
public final class Tensor {
  private final String name;
  private final DType dtype;
  private final int[] shape;
  private final byte[] data;

  private Tensor(String name, DType dtype, int[] shape, byte[] data) {
    if (data.length != (long) count(shape) * dtype.itemSize) {
      throw new IllegalArgumentException("tensor " + name + ": " + data.length + " bytes for shape "
          + Arrays.toString(shape) + " of " + dtype.wireName);
    }
    this.name = name;
    this.dtype = dtype;
    this.shape = shape.clone();
    this.data = data;
  }

  public static Tensor ofFloats(String name, int[] shape, float[] values) {
    ByteBuffer b = buffer(values.length * 4);
    for (float v : values) {
      b.putFloat(v);
    }
    return new Tensor(name, DType.FLOAT32, shape, b.array());
  }

  /** float16, float32 or float64 values given as doubles (each rounded once to the dtype). */
  public static Tensor ofDoubles(String name, DType dtype, int[] shape, double[] values) {
    ByteBuffer b = buffer(values.length * dtype.itemSize);
    for (double v : values) {
      switch (dtype) {
        case FLOAT16 -> b.putShort(Half.fromDouble(v));
        case FLOAT32 -> b.putFloat((float) v);
        case FLOAT64 -> b.putDouble(v);
        default -> throw new IllegalArgumentException(dtype.wireName + " is not a float dtype");
      }
    }
    return new Tensor(name, dtype, shape, b.array());
  }

  /** int32 or int64 values. */
  public static Tensor ofLongs(String name, DType dtype, int[] shape, long[] values) {
    ByteBuffer b = buffer(values.length * dtype.itemSize);
    for (long v : values) {
      if (dtype == DType.INT32) {
        if (v != (int) v) {
          throw new IllegalArgumentException(v + " does not fit int32");
        }
        b.putInt((int) v);
      } else if (dtype == DType.INT64) {
        b.putLong(v);
      } else {
        throw new IllegalArgumentException(dtype.wireName + " is not an integer dtype");
      }
    }
    return new Tensor(name, dtype, shape, b.array());
  }

  /** Wraps bytes the decoder already checked (no copy: the decoder made them). */
  static Tensor ofBytes(String name, DType dtype, int[] shape, byte[] data) {
    return new Tensor(name, dtype, shape, data);
  }

  public String name() {
    return name;
  }

  public DType dtype() {
    return dtype;
  }

  public int[] shape() {
    return shape.clone();
  }

  public int size() {
    return count(shape);
  }

  /** The values of a float32 tensor. */
  public float[] floats() {
    if (dtype != DType.FLOAT32) {
      throw new IllegalStateException("tensor " + name + " is " + dtype.wireName + ", not float32");
    }
    ByteBuffer b = view();
    float[] out = new float[size()];
    for (int i = 0; i < out.length; i++) {
      out[i] = b.getFloat();
    }
    return out;
  }

  /** The values of any dtype as doubles (exact for every float dtype and for |ints| < 2^53). */
  public double[] doubles() {
    ByteBuffer b = view();
    double[] out = new double[size()];
    for (int i = 0; i < out.length; i++) {
      out[i] = switch (dtype) {
        case FLOAT16 -> Half.toDouble(b.getShort());
        case FLOAT32 -> b.getFloat();
        case FLOAT64 -> b.getDouble();
        case INT32 -> b.getInt();
        case INT64 -> b.getLong();
      };
    }
    return out;
  }

  /** The little-endian bytes, C order (a copy). */
  public byte[] bytes() {
    return data.clone();
  }

  byte[] rawBytes() {
    return data;
  }

  /** Elements of a shape; {@code []} is a scalar (1). Caller guarantees it fits an int. */
  public static int count(int[] shape) {
    long n = 1;
    for (int d : shape) {
      n *= d;
      if (n > Integer.MAX_VALUE) {
        throw new IllegalArgumentException("shape " + Arrays.toString(shape) + " is too large");
      }
    }
    return (int) n;
  }

  private ByteBuffer view() {
    return ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
  }

  private static ByteBuffer buffer(int bytes) {
    return ByteBuffer.allocate(bytes).order(ByteOrder.LITTLE_ENDIAN);
  }
}
