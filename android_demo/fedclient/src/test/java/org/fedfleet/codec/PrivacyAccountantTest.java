package org.fedfleet.codec;

import static org.junit.jupiter.api.Assertions.assertEquals;

import org.junit.jupiter.api.Test;

/** The phone's epsilon equals the server's ledger (dp_accounting RdpAccountant; values from Python). */
class PrivacyAccountantTest {
  private static double eps(double delta, Object... releases) {
    PrivacyAccountant a = new PrivacyAccountant();
    for (int i = 0; i < releases.length; i += 3) {
      for (int n = 0; n < (Integer) releases[i + 2]; n++) {
        a.charge(new PrivacyAccountant.Release((String) releases[i], (Double) releases[i + 1]));
      }
    }
    return a.epsilon(delta);
  }

  @Test
  void matchesDpAccounting() {
    // protocol.privacy.local_epsilon({Release(...): count}, delta), printed with repr
    assertEquals(42.845493283868805, eps(1e-5, "gaussian", 0.3, 3), 1e-9);
    assertEquals(20.295820372509876, eps(1e-5, "gaussian", 1.1, 1, "gaussian", 0.7, 5), 1e-9);
    assertEquals(4.000793066451023, eps(1e-5, "laplace", 1.0, 4), 1e-9);
    assertEquals(2.0050751401882465, eps(1e-6, "laplace", 0.5, 1), 1e-9);
    assertEquals(0.0, new PrivacyAccountant().epsilon(1e-5));
  }

  @Test
  void calibrationMatchesDpAccounting() {
    // protocol.privacy.calibrate_noise_multiplier(mechanism, epsilon, delta)
    assertEquals(2.1491103291508313, PrivacyAccountant.calibrate("gaussian", 2.0, 1e-5), 1e-5);
    assertEquals(1.0028323233868024, PrivacyAccountant.calibrate("laplace", 1.0, 1e-5), 1e-5);
  }
}
