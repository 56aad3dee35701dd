"""Step 2: local differential privacy noise, added to the clipped update in float64.

Gaussian mechanism with std sigma = z * C on an update of L2 norm <= C (DP-FedAvg, McMahan
et al., 2018; Abadi et al., 2016), or Laplace with scale b = z * C on an update of L1 norm
<= C (Dwork et al., 2006). Everything after this step (sparsifying, quantizing, error
feedback, which only ever sees noised values) is post-processing and costs no privacy.
The accounting of each release lives in ``protocol.privacy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.protocol.codec.types import Update


@dataclass(frozen=True)
class GaussianNoise:
    std: float  # sigma = noise_multiplier * clip

    def __call__(self, update: Update, rng: np.random.Generator) -> Update:
        # one standard normal per element, tensors in update order, elements in C order
        return {name: a + self.std * rng.standard_normal(a.shape) for name, a in update.items()}


@dataclass(frozen=True)
class LaplaceNoise:
    scale: float  # b = noise_multiplier * clip

    def __call__(self, update: Update, rng: np.random.Generator) -> Update:
        return {name: a + rng.laplace(0.0, self.scale, a.shape) for name, a in update.items()}
