// Step 2: local differential privacy noise, added in binary64 to the clipped update.
//
// Gaussian mechanism, std sigma = z * C on an update of L2 norm <= C (DP-FedAvg, McMahan et
// al., 2018; Abadi et al., 2016), or Laplace with scale b = z * C on an update of L1 norm <= C
// (Dwork et al., 2006). One draw per element, tensors in order, elements in C order.
// Everything after this step is post-processing and costs no privacy (privacy.js accounts).

import { laplace, normal } from "./rng.js";

export function gaussianNoise(update, std, rng) {
  return update.map((t) => ({ ...t, data: t.data.map((x) => x + std * normal(rng)) }));
}

export function laplaceNoise(update, scale, rng) {
  return update.map((t) => ({ ...t, data: t.data.map((x) => x + laplace(rng, scale)) }));
}
