package org.fedfleet.client;

import java.util.Arrays;

/** A phone's private examples: features (flattened C, H, W, scaled to [0, 1]) and labels. */
public record Dataset(float[][] x, int[] y) {
  public Dataset {
    if (x.length != y.length || x.length == 0) {
      throw new IllegalArgumentException("a dataset needs as many labels as examples, and at least one");
    }
  }

  public int size() {
    return y.length;
  }

  public int features() {
    return x[0].length;
  }

  /** Shard {@code index} of {@code count} disjoint, interleaved shards (class mix kept). */
  public Dataset shard(int index, int count) {
    if (count < 1 || index < 0 || index >= count || count > size()) {
      throw new IllegalArgumentException("shard " + index + "/" + count + " of " + size() + " examples");
    }
    int n = (size() - index + count - 1) / count;
    float[][] xs = new float[n][];
    int[] ys = new int[n];
    for (int i = 0; i < n; i++) {
      xs[i] = x[index + i * count];
      ys[i] = y[index + i * count];
    }
    return new Dataset(xs, ys);
  }

  /** The first {@code n} examples (all of them if there are fewer). */
  public Dataset take(int n) {
    int m = Math.min(n, size());
    return new Dataset(Arrays.copyOf(x, m), Arrays.copyOf(y, m));
  }
}
