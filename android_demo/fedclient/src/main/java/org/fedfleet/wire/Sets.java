package org.fedfleet.wire;

import java.util.Arrays;
import java.util.Collections;
import java.util.HashSet;
import java.util.Set;

/** {@code Set.of} for Android before API 30, where the Java 9 collection factories are missing. */
public final class Sets {
  private Sets() {}

  public static Set<String> of(String... items) {
    return Collections.unmodifiableSet(new HashSet<>(Arrays.asList(items)));
  }
}
