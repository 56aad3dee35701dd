// The encoder's randomness: one generator object passed in, drawn from in step order
// (noise, rand-k, stochastic rounding), as protocol/codec uses one numpy Generator.
//
// CryptoRandom draws from crypto.getRandomValues (the OS CSPRNG): local DP noise must not be
// predictable by whoever sees the update. Any object with random() in [0, 1) works in its
// place (tests pass a seeded one).

const BATCH = 1024;

export class CryptoRandom {
  constructor(fill = (a) => globalThis.crypto.getRandomValues(a)) {
    this.fill = fill;
    this.words = new Uint32Array(BATCH);
    this.next = BATCH;
    this.spare = null; // the second normal of a Box-Muller pair
  }

  uint32() {
    if (this.next === BATCH) {
      this.fill(this.words);
      this.next = 0;
    }
    return this.words[this.next++];
  }

  /** Uniform in [0, 1) with 53 random bits (every binary64 multiple of 2^-53). */
  random() {
    const hi = this.uint32() >>> 5; // 27 bits
    const lo = this.uint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }
}

/** A standard normal draw (Box-Muller; 1 - random() is in (0, 1], so the log is finite). */
export function normal(rng) {
  if (rng.spare != null) {
    const z = rng.spare;
    rng.spare = null;
    return z;
  }
  const r = Math.sqrt(-2 * Math.log(1 - rng.random()));
  const theta = 2 * Math.PI * rng.random();
  rng.spare = r * Math.sin(theta);
  return r * Math.cos(theta);
}

/** Laplace(0, b): an exponential of mean b with a random sign. */
export function laplace(rng, b) {
  const e = -Math.log(1 - rng.random());
  return rng.random() < 0.5 ? -b * e : b * e;
}

/** A uniform integer in [0, n): floor of a 53-bit uniform, biased by less than n / 2^53. */
export function randint(rng, n) {
  return Math.floor(rng.random() * n);
}
