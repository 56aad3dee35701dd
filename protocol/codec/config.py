"""``EncoderConfig``: the one typed config of the update encoder, defaults visible here.

Each group switches one step of the pipeline on; leaving the group at its default leaves
the step out (clip=None: no clipping; noise=None: no local DP; sparsify=None: dense;
quant_bits=32: float32 values).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedfleet.protocol.quant import MAX_CHUNK

NoiseKind = Literal["gaussian", "laplace"]
SparsifyKind = Literal["topk", "randk"]
QUANT_BITS = (32, 8, 4, 2, 1)


@dataclass(frozen=True)
class EncoderConfig:
    # 1. clipping: scale the update so its norm is <= clip (the DP sensitivity C)
    clip: float | None = None  # None: no clipping (then no noise either)
    per_layer_clip: bool = False  # each of L tensors to clip/sqrt(L) (L1: clip/L): total stays <= clip
    clip_ord: Literal[1, 2] = 2  # 2: L2 norm (Gaussian); 1: L1 norm, which Laplace needs
    # 2. local DP noise, drawn in float64 after clipping, before sparsifying/quantizing
    noise: NoiseKind | None = None
    noise_multiplier: float | None = None  # std (Gaussian) / scale (Laplace) = noise_multiplier * clip
    epsilon: float | None = None  # ...or calibrate noise_multiplier to (epsilon, delta) per release
    delta: float | None = None
    # 3. sparsification, per tensor
    sparsify: SparsifyKind | None = None
    density: float | None = None  # fraction kept: k = max(1, floor(density * n + 1/2))
    k: int | None = None  # ...or a count: k = min(k, n)
    randk_rescale: bool = True  # multiply rand-k values by n/k so the send is unbiased
    error_feedback: bool = False  # keep what was not sent and add it to the next update
    ef_decay: float = 1.0  # residual *= ef_decay ** staleness before it is added
    # 4. quantization of the values sent
    quant_bits: Literal[32, 8, 4, 2, 1] = 32  # 32: plain float32
    stochastic_rounding: bool = True  # False: round half up (biased, reproducible)
    chunk: int = 256  # values per quantization scale
    quant_scale: Literal["max", "fit"] = "max"  # fit: least-squares scale per chunk (deterministic rounding only)
    # 5. container
    compress: bool = False  # zlib over the payload (FLAG_ZLIB), and the header when shorter (FLAG_ZLIB_HEADER)

    def __post_init__(self) -> None:
        self._check_clip()
        self._check_noise()
        self._check_sparsify()
        self._check_quant()
        if type(self.compress) is not bool:
            raise ValueError("compress must be a bool")

    def _check_clip(self) -> None:
        if self.clip is not None and not (
            _is_number(self.clip) and math.isfinite(self.clip) and self.clip > 0
        ):
            raise ValueError(f"clip must be a positive finite number or None, got {self.clip!r}")
        if type(self.per_layer_clip) is not bool:
            raise ValueError("per_layer_clip must be a bool")
        if self.per_layer_clip and self.clip is None:
            raise ValueError("per_layer_clip needs clip (the total bound to split over layers)")
        if self.clip_ord not in (1, 2) or type(self.clip_ord) is not int:
            raise ValueError(f"clip_ord must be 1 or 2, got {self.clip_ord!r}")

    def _check_noise(self) -> None:
        if self.noise is None:
            if any(v is not None for v in (self.noise_multiplier, self.epsilon, self.delta)):
                raise ValueError("noise_multiplier/epsilon/delta are set but noise is None")
            return
        if self.noise not in ("gaussian", "laplace"):
            raise ValueError(f"noise must be 'gaussian', 'laplace' or None, got {self.noise!r}")
        if self.clip is None:
            raise ValueError("noise needs clip: without a norm bound the noise protects nothing")
        if self.noise == "laplace" and self.clip_ord != 1:
            raise ValueError("laplace noise is calibrated to L1 sensitivity: set clip_ord=1")
        by_target = self.epsilon is not None or self.delta is not None
        if (self.noise_multiplier is None) == (not by_target):
            raise ValueError("give either noise_multiplier or a target (epsilon, delta), not both or neither")
        if self.noise_multiplier is not None and not _positive(self.noise_multiplier):
            raise ValueError(
                f"noise_multiplier must be a positive finite number, got {self.noise_multiplier!r}"
            )
        if by_target:
            if not _positive(self.epsilon):
                raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon!r}")
            if not (_is_number(self.delta) and 0 < self.delta < 1):  # type: ignore[operator]
                raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")

    def _check_sparsify(self) -> None:
        if self.sparsify is None:
            if self.density is not None or self.k is not None:
                raise ValueError("density/k are set but sparsify is None")
        else:
            if self.sparsify not in ("topk", "randk"):
                raise ValueError(f"sparsify must be 'topk', 'randk' or None, got {self.sparsify!r}")
            if (self.density is None) == (self.k is None):
                raise ValueError("sparsify needs exactly one of density (fraction) or k (count)")
            if self.density is not None and not (_is_number(self.density) and 0 < self.density <= 1):
                raise ValueError(f"density must be in (0, 1], got {self.density!r}")
            if self.k is not None and not (type(self.k) is int and self.k >= 1):
                raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if type(self.randk_rescale) is not bool or type(self.error_feedback) is not bool:
            raise ValueError("randk_rescale and error_feedback must be bools")
        if self.error_feedback and self.sparsify is None and self.quant_bits == 32:
            raise ValueError("error_feedback needs a lossy step (sparsify or quant_bits < 32)")
        if self.error_feedback and self.sparsify == "randk" and self.randk_rescale:
            # the residual would carry -(n/k - 1) x on every sent entry and grow without bound
            raise ValueError("error_feedback with rand-k needs randk_rescale=False")
        if not (_is_number(self.ef_decay) and 0 <= self.ef_decay <= 1):
            raise ValueError(f"ef_decay must be in [0, 1], got {self.ef_decay!r}")

    def _check_quant(self) -> None:
        if self.quant_bits not in QUANT_BITS or type(self.quant_bits) is not int:
            raise ValueError(f"quant_bits must be one of {QUANT_BITS}, got {self.quant_bits!r}")
        if type(self.stochastic_rounding) is not bool:
            raise ValueError("stochastic_rounding must be a bool")
        if type(self.chunk) is not int or not 1 <= self.chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be an int in [1, {MAX_CHUNK}], got {self.chunk!r}")
        if self.quant_scale not in ("max", "fit"):
            raise ValueError(f"quant_scale must be 'max' or 'fit', got {self.quant_scale!r}")
        if self.quant_scale == "fit" and (self.quant_bits == 32 or self.stochastic_rounding):
            # a fitted scale clamps values beyond it: stochastic rounding would lose its unbiasedness
            raise ValueError("quant_scale='fit' (--quant-scale fit) needs quant_bits < 32 (--quant-bits) and "
                             "stochastic_rounding=False (--quant-rounding nearest)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EncoderConfig:
        """Build from a TOML table; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown encoder config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


def _is_number(x: object) -> bool:
    return type(x) in (int, float)


def _positive(x: object) -> bool:
    return _is_number(x) and math.isfinite(x) and x > 0  # type: ignore[arg-type, operator]
