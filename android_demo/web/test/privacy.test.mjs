// The phone's RDP accountant against the server's (protocol/privacy.py over dp_accounting):
// expected values printed by the Python reference, e.g.
//   local_epsilon({Release("gaussian", 1.0): 3}, 1e-5) == 9.009958991683897
// Agreement to 1e-12 relative (Math.log and libm may differ in the last ulp).

import assert from "node:assert/strict";
import { test } from "node:test";

import { calibrateNoiseMultiplier, localEpsilon } from "../src/codec/privacy.js";

const close = (a, b, rel = 1e-12) => assert.ok(Math.abs(a - b) <= rel * Math.abs(b), `${a} vs ${b}`);

test("epsilon of composed releases equals dp_accounting's", () => {
  const cases = [
    [[{ mechanism: "gaussian", z: 1.0, count: 3 }], 1e-5, 9.009958991683897],
    [[{ mechanism: "gaussian", z: 0.5, count: 1 }], 1e-5, 10.725509696418232],
    [[{ mechanism: "gaussian", z: 4.0, count: 50 }], 1e-6, 10.089443168745937],
    [[{ mechanism: "laplace", z: 1.0, count: 1 }], 1e-5, 1.0028243238705594],
    [[{ mechanism: "laplace", z: 0.7, count: 2 }, { mechanism: "gaussian", z: 1.3, count: 1 }], 1e-5, 6.142406143308247],
  ];
  for (const [releases, delta, expected] of cases) close(localEpsilon(releases, delta), expected);
  assert.equal(localEpsilon([], 1e-5), 0);
});

test("calibrated noise multipliers agree with dp_accounting to its 1e-6 tolerance", () => {
  const cases = [["gaussian", 4.0, 1e-5, 1.1575687164573407], ["gaussian", 1.0, 1e-6, 4.530878341843883],
    ["laplace", 2.0, 1e-5, 0.5007070795598368]];
  for (const [mechanism, epsilon, delta, expected] of cases) {
    const z = calibrateNoiseMultiplier(mechanism, epsilon, delta);
    assert.ok(Math.abs(z - expected) <= 2e-6, `${mechanism}: ${z} vs ${expected}`);
    assert.ok(localEpsilon([{ mechanism, z, count: 1 }], delta) <= epsilon, "the calibrated z must meet the budget");
  }
});
