"""Error feedback: what an update did not deliver is kept and added to the next one.

EF-SGD (Stich et al., 2018, "Sparsified SGD with Memory"; Karimireddy et al., 2019,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes"): with
corrected = delta + decay**staleness * residual, the phone sends C(corrected) and keeps
residual = corrected - decoded(C(corrected)) in float64, so sent + residual == corrected
up to one float64 rounding: no mass is lost, only delayed. The residual includes the
quantization error, and is decayed per version of staleness because a residual made
against an old model points less and less in a useful direction.

The residual only ever holds post-noise values, so keeping it costs no privacy. It lives
on the phone and must survive restarts: ``state_dict``/``load_state_dict`` use named
arrays only (no pickle).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedfleet.protocol.codec.types import Pick, Update

_PREFIX = "residual/"
_VERSION_KEY = "base_version"


class ErrorFeedback:
    def __init__(self, decay: float = 1.0) -> None:
        self.decay = decay
        self.residual: Update = {}
        self.base_version: int | None = None  # model version the residual was made against

    def add_to(self, update: Update, staleness: int) -> Update:
        """corrected = update + decay**staleness * residual, for tensors of the same shape
        (a residual whose tensor changed shape or vanished is dropped)."""
        factor = self.decay**staleness
        out: Update = {}
        for name, a in update.items():
            r = self.residual.get(name)
            out[name] = a + factor * r if r is not None and r.shape == a.shape and factor else a
        return out

    def keep(self, corrected: Update, picks: Mapping[str, Pick], sent: Mapping[str, np.ndarray]) -> None:
        """residual = corrected - what the server will decode (``sent``: float32 values at
        ``picks[name].indices``)."""
        residual: Update = {}
        for name, c in corrected.items():
            r = np.array(c, dtype=np.float64, copy=True)
            flat = r.reshape(-1)
            idx = picks[name].indices
            if idx is None:
                flat -= sent[name]
            else:
                flat[idx] -= sent[name]
            residual[name] = r
        self.residual = residual

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {_PREFIX + name: r.copy() for name, r in self.residual.items()}
        state[_VERSION_KEY] = np.array(-1 if self.base_version is None else self.base_version, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        residual: Update = {}
        for key, arr in state.items():
            if key == _VERSION_KEY:
                continue
            if not key.startswith(_PREFIX):
                raise ValueError(f"unknown error-feedback state key {key!r}")
            r = np.asarray(arr, dtype=np.float64)
            if not np.isfinite(r).all():
                raise ValueError(f"residual {key!r} holds NaN or Inf")
            residual[key[len(_PREFIX) :]] = r.copy()
        version = int(np.asarray(state.get(_VERSION_KEY, -1)))
        self.residual = residual
        self.base_version = None if version < 0 else version
