// Local-DP accounting on the phone: the same RDP accountant the server's ledger runs
// (dp_accounting's RdpAccountant with its default orders, as protocol/privacy.py uses it),
// so the epsilon a phone shows is the epsilon the server charges it, up to the last ulp of
// Math.log.
//
// One release of the Gaussian mechanism with noise multiplier z (L2 sensitivity C, sigma =
// z C) has RDP alpha / (2 z^2) at order alpha; Laplace with scale b = z C (L1 sensitivity C)
// is pure eps = 1/z, with the exact RDP of Mironov (2017, "Renyi Differential Privacy",
// Proposition 6). Composition adds RDP; conversion to (epsilon, delta) is Proposition 12 of
// Canonne, Kamath and Steinke (2020), as dp_accounting.rdp.compute_epsilon.

export const RDP_ORDERS = [
  ...Array.from({ length: 99 }, (_, i) => 1 + (i + 1) / 10.0),
  ...Array.from({ length: 53 }, (_, i) => 11 + i),
  128, 256, 512, 1024,
];

function laplaceRdp(eps, a) {
  if (a === 1) return eps + Math.expm1(-eps);
  if (a < 1.1) { // Taylor series of log(1 + c x) / x, for numerical stability near order 1
    const c = Math.expm1(eps * (1 - 2 * a)) / (2 * a - 1);
    const v = -c * (a - 1);
    let sum = 0;
    for (let k = 1; k < 100; k++) sum += v ** (k - 1) / k;
    return eps + c * sum;
  }
  return eps + Math.log1p(((a - 1) * Math.expm1(eps * (1 - 2 * a))) / (2 * a - 1)) / (a - 1);
}

/** RDP at every order of `count` releases of { mechanism, z }. */
export function releaseRdp({ mechanism, z }, count = 1) {
  if (mechanism === "gaussian") return RDP_ORDERS.map((a) => count * (a / (2 * z ** 2)));
  if (mechanism === "laplace") return RDP_ORDERS.map((a) => count * laplaceRdp(1 / z, a));
  throw new RangeError(`mechanism must be 'gaussian' or 'laplace', got ${mechanism}`);
}

/** Smallest epsilon over the orders for the composed RDP curve at `delta`. */
export function rdpToEpsilon(rdp, delta) {
  let best = Infinity;
  RDP_ORDERS.forEach((a, i) => {
    const r = rdp[i];
    let eps;
    if (r < 0) eps = 0;
    else if (delta ** 2 + Math.expm1(-r) > 0) eps = 0; // bounded through the KL divergence
    else if (a > 1.01) eps = r + Math.log1p(-1 / a) - Math.log(delta * a) / (a - 1);
    else eps = Infinity;
    best = Math.min(best, eps);
  });
  return Math.max(0, best);
}

/** epsilon at `delta` after composing [{ mechanism, z, count }] (0 for none). */
export function localEpsilon(releases, delta) {
  if (!(delta > 0 && delta < 1)) throw new RangeError(`delta must be in (0, 1), got ${delta}`);
  const live = releases.filter((r) => r.count > 0);
  if (!live.length) return 0;
  const total = new Array(RDP_ORDERS.length).fill(0);
  for (const r of live) releaseRdp(r, r.count).forEach((v, i) => { total[i] += v; });
  return rdpToEpsilon(total, delta);
}

/**
 * Smallest z (to 1e-6) with which one release is (epsilon, delta)-DP: the bracket search of
 * dp_accounting.calibrate_dp_mechanism from [1e-3/epsilon, 2e-3/epsilon], then bisection
 * (the reference refines with Brent's method, so the two agree to the tolerance, not the bit).
 */
export function calibrateNoiseMultiplier(mechanism, epsilon, delta, tol = 1e-6) {
  const gap = (z) => localEpsilon([{ mechanism, z, count: 1 }], delta) - epsilon;
  let lower = 1e-3 / epsilon;
  let upper = 2 * lower;
  let span = upper - lower;
  let gLower = gap(lower);
  let gUpper = gap(upper);
  for (let tries = 0; gLower * gUpper > 0; tries++) {
    if (tries >= 30) throw new RangeError("no noise multiplier within 2^30 of the initial guess meets the target");
    span *= 2;
    [lower, gLower] = [upper, gUpper];
    upper += span;
    gUpper = gap(upper);
  }
  while (upper - lower > tol) {
    const middle = (lower + upper) / 2;
    const g = gap(middle);
    if (g === 0) return middle;
    if (gLower * g < 0) [upper, gUpper] = [middle, g];
    else [lower, gLower] = [middle, g];
  }
  return gUpper <= 0 ? upper : lower; // the end that meets the budget (epsilon decreases with z)
}
