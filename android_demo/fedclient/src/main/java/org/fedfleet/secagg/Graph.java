package org.fedfleet.secagg;

import java.nio.ByteBuffer;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.TreeSet;

/** The SecAgg+ neighbour ring: phones sorted by SHA-256(seed || index), k/2 on either side. */
public final class Graph {
  private Graph() {}

  public static List<Integer> ringOrder(int size, byte[] seed) {
    List<byte[]> keys = new ArrayList<>();
    List<Integer> order = new ArrayList<>();
    try {
      for (int i = 1; i <= size; i++) {
        MessageDigest sha = MessageDigest.getInstance("SHA-256");
        sha.update(seed);
        sha.update(ByteBuffer.allocate(4).putInt(i).array());
        keys.add(sha.digest());
        order.add(i);
      }
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException("SHA-256 is part of every JDK", e);
    }
    order.sort((a, b) -> {
      int c = Arrays.compareUnsigned(keys.get(a - 1), keys.get(b - 1));
      return c != 0 ? c : Integer.compare(a, b);
    });
    return order;
  }

  public static TreeSet<Integer> neighboursOf(int size, int degree, byte[] seed, int index) {
    TreeSet<Integer> out = new TreeSet<>();
    if (degree >= size - 1) {
      for (int i = 1; i <= size; i++) {
        if (i != index) {
          out.add(i);
        }
      }
      return out;
    }
    List<Integer> order = ringOrder(size, seed);
    int pos = order.indexOf(index);
    for (int step = 1; step <= degree / 2; step++) {
      out.add(order.get(Math.floorMod(pos + step, size)));
      out.add(order.get(Math.floorMod(pos - step, size)));
    }
    return out;
  }
}
