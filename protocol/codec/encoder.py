"""``UpdateEncoder``: clip -> local DP noise -> (+ residual) -> sparsify -> quantize -> bytes.

The pipeline is assembled once from ``EncoderConfig``; a step the config leaves out is
simply not in the list, so the hot path has no flags to test. All randomness (noise,
rand-k, stochastic rounding) comes from the one ``numpy.random.Generator`` passed in, in
that order, so a seed reproduces an update exactly.

The server needs nothing from here: ``protocol.decode_message`` decodes every encoding
to dense float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfleet.protocol.codec.clip import Clip
from fedfleet.protocol.codec.config import EncoderConfig
from fedfleet.protocol.codec.feedback import ErrorFeedback
from fedfleet.protocol.codec.noise import GaussianNoise, LaplaceNoise
from fedfleet.protocol.codec.quantize import Float32, Quantize, ValueCoder, to_wire
from fedfleet.protocol.codec.sparsify import RandK, TopK, keep_all
from fedfleet.protocol.codec.types import DenseStep, Update
from fedfleet.protocol.state import STATE_PREFIX
from fedfleet.protocol.wire import TensorSpec, WireTensor, encode_wire

if TYPE_CHECKING:
    from fedfleet.protocol.privacy import Release


def resolve_noise_multiplier(config: EncoderConfig) -> float | None:
    """z as configured, or calibrated so that one release is (epsilon, delta)-DP under the
    same RDP accounting the ledger uses (``protocol.privacy``)."""
    if config.noise is None:
        return None
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    from fedfleet.protocol.privacy import calibrate_noise_multiplier  # dp_accounting is slow to import

    assert config.epsilon is not None and config.delta is not None
    return calibrate_noise_multiplier(config.noise, config.epsilon, config.delta)


def dense_steps(config: EncoderConfig, noise_multiplier: float | None) -> list[DenseStep]:
    steps: list[DenseStep] = []
    if config.clip is not None:
        steps.append(Clip(config.clip, config.per_layer_clip, config.clip_ord))
    if noise_multiplier is not None:
        assert config.clip is not None
        scale = noise_multiplier * config.clip
        steps.append(GaussianNoise(scale) if config.noise == "gaussian" else LaplaceNoise(scale))
    return steps


def value_coder(config: EncoderConfig) -> ValueCoder:
    if config.quant_bits == 32:
        return Float32()
    return Quantize(config.quant_bits, config.chunk, config.stochastic_rounding, config.quant_scale == "fit")


class UpdateEncoder:
    """Turns one model delta into one "update" message. Stateful only through error
    feedback (the residual), which ``state_dict``/``load_state_dict`` persist."""

    def __init__(self, config: EncoderConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        self.noise_multiplier = resolve_noise_multiplier(config)
        self.steps = dense_steps(config, self.noise_multiplier)
        self.sparsifier: TopK | RandK | None = None
        if config.sparsify == "topk":
            self.sparsifier = TopK(config.density, config.k)
        elif config.sparsify == "randk":
            self.sparsifier = RandK(config.density, config.k, config.randk_rescale)
        self.values = value_coder(config)
        self.feedback = ErrorFeedback(config.ef_decay) if config.error_feedback else None
        self._previous: tuple[Update, int | None] | None = None  # residual before the last encode
        # Nothing to do but send float32 (the default codec): skip the float64 round trip.
        self._plain = not self.steps and self.sparsifier is None and self.feedback is None and isinstance(
            self.values, Float32)

    def encode(
        self, delta: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, staleness: int = 0,
        state: Mapping[str, np.ndarray] | None = None,
    ) -> bytes:
        """delta: name -> float array (params' - params(v)). ``staleness``: model versions
        between the residual's base version and this delta's (decays the residual). ``state``:
        the model's state after training (buffer name -> array), sent as it is (FORMAT.md section 11).
        Returns a full wire message of kind "update" with ``meta`` in its header."""
        if type(staleness) is not int or staleness < 0:
            raise ValueError(f"staleness must be an int >= 0, got {staleness!r}")
        extra = state_tensors(state or {})
        if self._plain:
            plain = _plain_float32(delta)
            if plain is not None:
                return encode_wire("update", meta, plain + extra, compress=self.config.compress)
        update = _as_float64(delta)
        for step in self.steps:
            update = step(update, self.rng)
        if self.feedback is not None:
            self._previous = (self.feedback.residual, self.feedback.base_version)  # keep() never mutates it
            update = self.feedback.add_to(update, staleness)
        picks = self.sparsifier(update, self.rng) if self.sparsifier is not None else keep_all(update)
        wire: list[WireTensor] = []
        sent: dict[str, np.ndarray] = {}
        for name, a in update.items():
            section = self.values(picks[name].values, self.rng)
            wire.append(to_wire(name, a.shape, picks[name], section, self.values.bits))
            if self.feedback is not None:
                sent[name] = section.decoded()
        if self.feedback is not None:
            self.feedback.keep(update, picks, sent)
            version = meta.get("base_version")
            self.feedback.base_version = version if type(version) is int else None
        return encode_wire("update", meta, wire + extra, compress=self.config.compress)

    def residual(self) -> Update:
        """The current residual (float64), empty without error feedback."""
        return {} if self.feedback is None else {n: r.copy() for n, r in self.feedback.residual.items()}

    @property
    def residual_base_version(self) -> int | None:
        """meta["base_version"] of the last encoded update: staleness = new base - this."""
        return None if self.feedback is None else self.feedback.base_version

    def state_dict(self) -> dict[str, np.ndarray]:
        """Named arrays ("residual/<tensor>", "base_version"); safe for np.savez."""
        return {} if self.feedback is None else self.feedback.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if self.feedback is None:
            if state:
                raise ValueError("this encoder has no error feedback, so it has no state to load")
            return
        self.feedback.load_state_dict(state)

    def rollback(self) -> None:
        """Undo the residual change of the last ``encode`` (the upload failed and the
        phone will retrain and encode again). Privacy is not refunded: the ledger should
        count the lost release, since it cannot know nobody saw it."""
        if self.feedback is not None and self._previous is not None:
            self.feedback.residual, self.feedback.base_version = self._previous
            self._previous = None

    def release(self) -> Release | None:
        """What one ``encode`` costs in privacy, for ``PrivacyLedger.charge``."""
        if self.noise_multiplier is None or self.config.noise is None:
            return None
        from fedfleet.protocol.privacy import Release

        return Release(self.config.noise, self.noise_multiplier)


def _plain_float32(delta: Mapping[str, np.ndarray]) -> list[WireTensor] | None:
    """The default codec's wire tensors straight from float32/float64 deltas: the same bytes
    as the float64 pipeline (float32 -> float64 -> float32 is exact, and float64 -> float32
    rounds once either way). None for other dtypes or non-finite values, which the full
    path converts or refuses with its own message."""
    wire: list[WireTensor] = []
    for name, arr in delta.items():
        a = np.asarray(arr)
        if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
            return None
        if not np.isfinite(a).all():
            return None
        blob = np.ascontiguousarray(a, dtype="<f4").tobytes()
        wire.append(WireTensor(name, "float32", tuple(a.shape), "dense", {}, blob))
    return wire


def state_tensors(state: Mapping[str, np.ndarray]) -> list[WireTensor]:
    """Dense ``"state:<name>"`` entries: float32, or int64 for integer counters; never clipped,
    noised, sparsified or quantized."""
    wire: list[WireTensor] = []
    for name, arr in state.items():
        a = np.asarray(arr)
        dtype = "<i8" if a.dtype.kind in "iu" else "<f4"
        blob = np.ascontiguousarray(a, dtype=dtype).tobytes()
        wire.append(WireTensor(STATE_PREFIX + name, "int64" if dtype == "<i8" else "float32", tuple(a.shape), "dense",
                               {}, blob))
    return wire


def _as_float64(delta: Mapping[str, np.ndarray]) -> Update:
    update: Update = {}
    for name, arr in delta.items():
        a = np.asarray(arr)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"delta {name!r}: dtype {a.dtype} is not numeric")
        a = a.astype(np.float64)  # a copy: steps never write into the caller's arrays
        if not np.isfinite(a).all():
            raise ValueError(f"delta {name!r} holds NaN or Inf")
        update[name] = a
    return update


def dense_float32_nbytes(tensors: Mapping[str, np.ndarray | TensorSpec | tuple[int, ...]]) -> int:
    """Bytes of the same tensors as raw float32 (payload only, no header): the
    denominator of compression_ratio = dense_float32_nbytes / len(message)."""
    total = 0
    for t in tensors.values():
        shape = t if isinstance(t, tuple) else t.shape
        total += 4 * math.prod(shape)
    return total
