"""Server optimizers applied to each merged pseudo-gradient (pure functions).

The pseudo-gradient is the weighted mean of phone deltas (new - old, so it points downhill).
FedAvg adds it scaled by the server learning rate; FedAvgM keeps momentum (Hsu et al. 2019);
FedAdam and FedYogi keep first and second moments (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2, with tau the adaptivity).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]
OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "fedavg"
    lr: float = 1.0  # server learning rate (Reddi et al. use ~1e-2..1e-1 for the adaptive ones)
    momentum: float = 0.9  # FedAvgM
    beta1: float = 0.9  # FedAdam / FedYogi
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: larger = closer to SGD

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose from {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.tau > 0):
            raise ValueError("server optimizer needs lr > 0, momentum/betas in [0, 1) and tau > 0")

    def step(self, params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], state: Params) -> tuple[Params, Params]:
        """Return (new params, new state). ``state`` holds float64 moments named ``m/NAME``, ``v/NAME``."""
        new_params: Params = {}
        new_state: Params = {}
        for name, p in params.items():
            d = np.asarray(delta[name], dtype=np.float64)
            update, moments = self._update(d, state.get(f"m/{name}"), state.get(f"v/{name}"))
            new_params[name] = (p.astype(np.float64) + self.lr * update).astype(p.dtype)
            new_state.update({f"{k}/{name}": v for k, v in moments.items()})
        return new_params, new_state

    def _update(self, d: np.ndarray, m: np.ndarray | None, v: np.ndarray | None) -> tuple[np.ndarray, Params]:
        if self.name == "fedavg":
            return d, {}
        m = np.zeros_like(d) if m is None else m
        if self.name == "fedavgm":
            m = self.momentum * m + d
            return m, {"m": m}
        m = self.beta1 * m + (1 - self.beta1) * d
        sq = d * d
        if v is None:
            v = np.full_like(d, self.tau**2)  # Reddi et al. initialise v_0 >= tau^2
        if self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * sq
        else:  # fedyogi
            v = v - (1 - self.beta2) * sq * np.sign(v - sq)
        return m / (np.sqrt(v) + self.tau), {"m": m, "v": v}
