"""Byzantine phones, for tests and benchmarks: pure functions that corrupt an update or labels.

Model poisoning acts on the delta a phone uploads (sign flip, scaling as in the boosting of
Bhagoji et al. 2019, Gaussian noise as the Byzantine workers of Blanchard et al. 2017); data
poisoning acts on the labels it trains on (label flipping, Tolpegin et al. 2020). An attacking
phone still speaks the protocol and its codec: a codec that clips (local DP) also bounds a
scaled update, as it would for an attacker who uses the stock app.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]


def sign_flip(delta: Mapping[str, np.ndarray]) -> Params:
    """-delta: push the model the other way."""
    return {n: np.negative(v) for n, v in delta.items()}


def scale(delta: Mapping[str, np.ndarray], factor: float) -> Params:
    """factor x delta, in the delta's dtype (x10, x100: model replacement by boosting)."""
    return {n: (np.asarray(v) * factor).astype(np.asarray(v).dtype) for n, v in delta.items()}


def gaussian(delta: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Params:
    """The update replaced by N(0, std^2) noise of the same shapes and dtypes."""
    return {n: rng.normal(0.0, std, size=np.shape(v)).astype(np.asarray(v).dtype) for n, v in delta.items()}


def label_flip(y: np.ndarray, num_classes: int) -> np.ndarray:
    """y -> C - 1 - y (an involution that moves every label unless C is odd and y = (C-1)/2)."""
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return (num_classes - 1 - y).astype(y.dtype)


KINDS = ("none", "signflip", "scale", "noise", "labelflip")


@dataclass(frozen=True)
class Attack:
    """What a Byzantine phone does: ``none``, ``signflip``, ``scale:F``, ``noise:STD``, ``labelflip``."""

    kind: str = "none"
    value: float = 0.0  # scale: the factor; noise: the standard deviation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attack {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind == "noise" and not (np.isfinite(self.value) and self.value > 0):
            raise ValueError(f"noise attack needs a positive finite std, got {self.value}")
        if self.kind == "scale" and not np.isfinite(self.value):
            raise ValueError(f"scale attack needs a finite factor, got {self.value}")

    @property
    def poisons_data(self) -> bool:
        return self.kind == "labelflip"

    def apply_delta(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> Params:
        """The update this phone uploads instead of ``delta`` (unchanged for data attacks)."""
        if self.kind == "signflip":
            return sign_flip(delta)
        if self.kind == "scale":
            return scale(delta, self.value)
        if self.kind == "noise":
            return gaussian(delta, self.value, rng)
        return dict(delta)

    def apply_labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels this phone trains on (unchanged unless ``labelflip``)."""
        return label_flip(y, num_classes) if self.kind == "labelflip" else y


def parse_attack(text: str) -> Attack:
    """``none`` | ``signflip`` | ``scale:F`` | ``noise:STD`` | ``labelflip``."""
    kind, _, arg = text.strip().lower().partition(":")
    needs_value = kind in ("scale", "noise")
    if needs_value != bool(arg):
        raise ValueError(f"attack {text!r}: scale and noise take one number (scale:10), the others none")
    try:
        return Attack(kind, float(arg) if arg else 0.0)
    except ValueError as exc:
        raise ValueError(f"attack {text!r}: {exc}") from None


def choose_attackers(num_phones: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of round(fraction x num_phones) phones drawn without replacement."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the attacker fraction should be in [0, 1], got {fraction}")
    count = int(round(fraction * num_phones))
    return np.sort(rng.choice(num_phones, size=count, replace=False))
