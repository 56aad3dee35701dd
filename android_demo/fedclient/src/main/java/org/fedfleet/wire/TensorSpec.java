package org.fedfleet.wire;

import java.util.Arrays;

/** What a receiver expects of one tensor: shape and dtype (the server's task lists them). */
public final class TensorSpec {
  private final int[] shape;
  public final DType dtype;

  public TensorSpec(int[] shape, DType dtype) {
    this.shape = shape.clone();
    this.dtype = dtype;
  }

  public int[] shape() {
    return shape.clone();
  }

  public boolean matches(int[] otherShape, DType otherDtype) {
    return dtype == otherDtype && Arrays.equals(shape, otherShape);
  }

  @Override
  public String toString() {
    return dtype.wireName + Arrays.toString(shape);
  }
}
