package org.fedfleet.codec;

import java.util.Map;
import java.util.Random;

/**
 * A step on the whole update (clip, noise): tensors by name, in message order, as binary64
 * values in C order, changed in place. Steps draw randomness only from {@code rng}.
 */
interface DenseStep {
  void apply(Map<String, double[]> update, Random rng);
}
