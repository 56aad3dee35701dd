"""The update codec: every encoding round-trips through decode_message, stochastic steps
are unbiased, error feedback conserves mass, clipping survives quantization, noise has
the configured scale. Oracles are plain numpy restatements of FORMAT.md."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from typing import Any, Literal

import numpy as np
import pytest

from fedfleet.protocol import EncoderConfig, TensorSpec, UpdateEncoder, decode_message, dense_float32_nbytes
from fedfleet.protocol.canonical import canonical_header
from fedfleet.protocol.codec.sparsify import keep_count
from fedfleet.protocol.errors import MalformedMessage
from fedfleet.protocol.quant import fit_scales, quantized_norm_bound
from fedfleet.protocol.wire import FLAG_ZLIB, FLAG_ZLIB_HEADER, MAX_HEADER_BYTES, frame
from tests.conftest import MakeClient, register

QuantBits = Literal[32, 8, 4, 2, 1]  # EncoderConfig.quant_bits

META = {"update_id": "u-1", "base_version": 4, "num_examples": 32, "train_loss": 0.25, "round": 1}


def run(config: EncoderConfig, delta: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    body = UpdateEncoder(config, np.random.default_rng(seed)).encode(delta, META)
    specs = {n: TensorSpec(tuple(a.shape)) for n, a in delta.items()}
    msg = decode_message(body, expected=specs, max_bytes=len(body))
    assert msg.kind == "update" and msg.meta == META
    for name, arr in msg.tensors.items():
        assert arr.dtype == np.float32 and arr.shape == delta[name].shape
    return msg.tensors


def sample(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "fc.weight": (rng.standard_normal((10, 37)) * 0.01).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
    }


def chunk_scales(x: np.ndarray, chunk: int) -> np.ndarray:
    """Oracle: max |x| of each element's chunk, per element."""
    flat = np.abs(x.ravel().astype(np.float64))
    return np.array([flat[(i // chunk) * chunk : (i // chunk + 1) * chunk].max() for i in range(flat.size)])


# --- round trips ---------------------------------------------------------------------------


def test_dense_float32_round_trip_is_exact() -> None:
    delta = sample()
    out = run(EncoderConfig(), delta)
    for name, arr in delta.items():
        np.testing.assert_array_equal(out[name], arr)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("chunk", [1, 7, 256])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quant_error_within_step(bits: QuantBits, chunk: int, stochastic: bool) -> None:
    delta = sample()
    out = run(EncoderConfig(quant_bits=bits, chunk=chunk, stochastic_rounding=stochastic), delta)
    levels = 2**bits - 1
    for name, x in delta.items():
        s = chunk_scales(x, chunk).reshape(x.shape)
        err = np.abs(out[name].astype(np.float64) - x)
        step = (2.0 if stochastic else 1.0) * s / levels
        assert np.all(err <= step * (1 + 1e-6) + 1e-30), name
        assert np.all(np.abs(out[name]) <= s * (1 + 1e-7)), name


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_deterministic_quant_matches_format_md(bits: QuantBits) -> None:
    x = sample()["fc.bias"]
    chunk = 3
    out = run(EncoderConfig(quant_bits=bits, chunk=chunk, stochastic_rounding=False), {"b": x})["b"]
    s = chunk_scales(x, chunk)
    levels = 2**bits - 1
    q = np.clip(np.floor((x / s + 1) * levels / 2 + 0.5), 0, levels)
    np.testing.assert_array_equal(out, ((s * (2 * q - levels)) / levels).astype(np.float32))


@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("k", [1, 5, 37, 400])
def test_topk_keeps_largest_magnitudes(bits: QuantBits, k: int) -> None:
    x = sample()["fc.weight"]
    config = EncoderConfig(sparsify="topk", k=k, quant_bits=bits, stochastic_rounding=False)
    out = run(config, {"w": x})["w"].ravel()
    keep = np.argsort(-np.abs(x.ravel()), kind="stable")[: min(k, x.size)]
    assert set(np.flatnonzero(out)) <= set(keep)
    if bits == 32:
        expected = np.zeros(x.size, np.float32)
        expected[keep] = x.ravel()[keep]
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("n", "k", "coding"), [(1000, 3, "varint"), (16, 8, "bitmap"), (80, 10, "bitmap")])
def test_index_coding_is_the_smaller(n: int, k: int, coding: str) -> None:
    x = np.arange(1, n + 1, dtype=np.float32)  # top-k = the last k: gaps of 1
    body = UpdateEncoder(EncoderConfig(sparsify="topk", k=k), np.random.default_rng(0)).encode({"w": x}, META)
    header = body[12 : 12 + int.from_bytes(body[8:12], "little")].decode()
    assert f'"index":"{coding}"' in header
    out = decode_message(body).tensors["w"]
    np.testing.assert_array_equal(np.flatnonzero(out), np.arange(n - k, n))


def test_randk_rescales_by_n_over_k() -> None:
    x = sample()["fc.weight"].ravel()
    out = run(EncoderConfig(sparsify="randk", density=0.1), {"w": x})["w"]
    k = keep_count(x.size, 0.1, None)
    idx = np.flatnonzero(out)
    assert idx.size == k
    np.testing.assert_array_equal(out[idx], (x[idx].astype(np.float64) * (x.size / k)).astype(np.float32))


def test_keep_count_rounds_half_up() -> None:
    assert keep_count(10, 0.7, None) == 7  # 0.7 * 10 is 7.000000000000001 in binary64
    assert keep_count(16, 0.45, None) == 7
    assert keep_count(5, 0.01, None) == 1 and keep_count(0, 0.5, None) == 0
    assert keep_count(5, None, 9) == 5


@pytest.mark.parametrize(
    "config",
    [
        EncoderConfig(),
        EncoderConfig(quant_bits=2),
        EncoderConfig(sparsify="topk", density=0.5, quant_bits=8),
        EncoderConfig(sparsify="randk", k=2, quant_bits=1, compress=True),
        EncoderConfig(clip=1.0, noise="gaussian", noise_multiplier=1.0, per_layer_clip=True),
    ],
)
def test_empty_and_scalar_tensors(config: EncoderConfig) -> None:
    delta = {
        "empty": np.zeros((2, 0), np.float32),
        "scalar": np.array(3.0, np.float32),
        "v": np.ones(3, np.float32),
    }
    out = run(config, delta)
    assert out["empty"].shape == (2, 0) and out["scalar"].shape == ()


def test_same_seed_same_bytes() -> None:
    config = EncoderConfig(
        clip=1.0, noise="gaussian", noise_multiplier=0.3, sparsify="randk", density=0.2, quant_bits=4
    )
    a = UpdateEncoder(config, np.random.default_rng(9)).encode(sample(), META)
    b = UpdateEncoder(config, np.random.default_rng(9)).encode(sample(), META)
    c = UpdateEncoder(config, np.random.default_rng(10)).encode(sample(), META)
    assert a == b and a != c


# --- unbiasedness ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_stochastic_quantization_is_unbiased(bits: QuantBits) -> None:
    chunk, draws = 16, 4000
    x = np.random.default_rng(3).uniform(-1, 1, 64).astype(np.float32)
    # one message of `draws` copies: chunks align with copies, so each copy is one draw
    out = run(EncoderConfig(quant_bits=bits, chunk=chunk), {"x": np.tile(x, draws)}, seed=bits)["x"]
    draws_x = out.reshape(draws, x.size).astype(np.float64)
    s = chunk_scales(x, chunk)
    levels = 2**bits - 1
    step = 2 * s / levels
    lo = -s + step * np.floor((x + s) / step)
    var = np.maximum((lo + step - x) * (x - lo), 1e-30)  # exact two-point variance
    z = (draws_x.mean(axis=0) - x) / np.sqrt(var / draws)
    assert np.abs(z).max() < 5.0


def _sum_error_z(config: EncoderConfig, deltas: np.ndarray) -> float:
    """Largest |z| over coordinates of the error of the server's sum, self-normalised:
    sum_p (decoded_p - delta_p) / sqrt(sum_p (decoded_p - delta_p)^2)."""
    encoder = UpdateEncoder(config, np.random.default_rng(6))
    decoded = np.stack([decode_message(encoder.encode({"w": d}, META)).tensors["w"] for d in deltas])
    err = decoded.astype(np.float64) - deltas
    return float(np.abs(err.sum(axis=0) / np.sqrt((err**2).sum(axis=0))).max())


def test_sum_over_phones_is_unbiased() -> None:
    """Rand-k with n/k rescaling, then stochastic 2-bit: E[decoded] = delta per phone, so the
    server's sum over phones is unbiased. Deltas have a non-zero mean so that a biased
    encoder cannot hide behind cancellation (the control below shows the test has power)."""
    deltas = (1.0 + 0.5 * np.random.default_rng(5).standard_normal((3000, 24))).astype(np.float32)
    assert _sum_error_z(EncoderConfig(sparsify="randk", density=0.25, quant_bits=2, chunk=4), deltas) < 5.0
    assert _sum_error_z(EncoderConfig(sparsify="randk", density=0.25, randk_rescale=False), deltas) > 10.0


# --- fitted scales (quant_scale="fit") ------------------------------------------------------


def _topk_values(seed: int, n: int = 4000, k: int = 300) -> np.ndarray:
    """What a top-k sparsifier hands the quantizer: the k largest of a heavy-tailed tensor."""
    x = np.random.default_rng(seed).standard_t(3, n).astype(np.float32)
    return x[np.sort(np.argsort(-np.abs(x), kind="stable")[:k])]


def _decode_sparse_values(config: EncoderConfig, v: np.ndarray) -> np.ndarray:
    return run(config, {"v": v})["v"].astype(np.float64)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("chunk", [7, 64])
def test_fitted_scale_never_raises_the_error(bits: QuantBits, chunk: int) -> None:
    """Per chunk, the squared error with the fitted scale is at most that of s = max|x|, and
    every value decodes to the level nearest to it on the fitted grid (oracle: all levels)."""
    for seed in range(3):
        v = _topk_values(seed)
        fixed = _decode_sparse_values(EncoderConfig(quant_bits=bits, chunk=chunk, stochastic_rounding=False), v)
        fitted = _decode_sparse_values(
            EncoderConfig(quant_bits=bits, chunk=chunk, stochastic_rounding=False, quant_scale="fit"), v
        )
        x = v.astype(np.float64)
        scales = fit_scales(v, bits, chunk).astype(np.float64)  # what the message carries
        lv = 2**bits - 1
        for c in range(0, v.size, chunk):
            part = slice(c, c + chunk)
            assert np.sum((fitted[part] - x[part]) ** 2) <= np.sum((fixed[part] - x[part]) ** 2)
            grid = (scales[c // chunk] * (2 * np.arange(lv + 1) - lv)) / lv
            nearest = grid[np.abs(x[part][:, None] - grid[None, :]).argmin(axis=1)]
            np.testing.assert_allclose(fitted[part], nearest, rtol=1e-6, atol=0)


def test_one_bit_fitted_scale_is_sign_times_mean_magnitude() -> None:
    """At 1 bit the fitted code is STC's (Sattler et al. 2019): sign(x) * mean|x| per chunk."""
    v = _topk_values(7)
    chunk = 50
    out = _decode_sparse_values(EncoderConfig(quant_bits=1, chunk=chunk, stochastic_rounding=False,
                                              quant_scale="fit"), v)
    x = v.astype(np.float64)
    for c in range(0, v.size, chunk):
        mean = np.float32(np.abs(x[c : c + chunk]).mean())
        np.testing.assert_array_equal(out[c : c + chunk], np.sign(x[c : c + chunk]) * np.float64(mean))


def test_fitted_scale_with_error_feedback_conserves_mass() -> None:
    config = EncoderConfig(sparsify="topk", density=0.1, quant_bits=1, chunk=8, error_feedback=True,
                           stochastic_rounding=False, quant_scale="fit")
    encoder = UpdateEncoder(config, np.random.default_rng(0))
    total_in = {n: np.zeros(a.shape) for n, a in sample().items()}
    total_sent = {n: np.zeros(a.shape) for n, a in sample().items()}
    for step in range(5):
        delta = sample(step)
        sent = decode_message(encoder.encode(delta, META)).tensors
        for name, d in delta.items():
            total_in[name] += d
            total_sent[name] += sent[name]
    for name in total_in:
        np.testing.assert_allclose(
            total_sent[name] + encoder.residual()[name], total_in[name], rtol=0, atol=1e-13
        )


# --- error feedback --------------------------------------------------------------------------


def test_error_feedback_conserves_mass() -> None:
    config = EncoderConfig(sparsify="topk", density=0.1, quant_bits=4, chunk=8, error_feedback=True)
    encoder = UpdateEncoder(config, np.random.default_rng(0))
    total_in = {n: np.zeros(a.shape) for n, a in sample().items()}
    total_sent = {n: np.zeros(a.shape) for n, a in sample().items()}
    for step in range(5):
        delta = sample(step)
        before = encoder.residual()
        sent = decode_message(encoder.encode(delta, META)).tensors
        after = encoder.residual()
        for name, d in delta.items():
            corrected = d.astype(np.float64) + before.get(name, 0.0)
            np.testing.assert_allclose(sent[name] + after[name], corrected, rtol=0, atol=1e-15)
            total_in[name] += d
            total_sent[name] += sent[name]
    for name in total_in:  # telescoping: nothing lost, only delayed
        np.testing.assert_allclose(
            total_sent[name] + encoder.residual()[name], total_in[name], rtol=0, atol=1e-13
        )


def test_error_feedback_state_survives_a_restart() -> None:
    config = EncoderConfig(
        sparsify="topk", k=20, quant_bits=8, error_feedback=True, stochastic_rounding=False
    )
    a = UpdateEncoder(config, np.random.default_rng(0))
    a.encode(sample(1), META)
    buf = io.BytesIO()
    state: dict[str, Any] = a.state_dict()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as saved:
        b = UpdateEncoder(config, np.random.default_rng(0))
        b.load_state_dict(dict(saved))
    assert b.residual_base_version == META["base_version"]
    assert a.encode(sample(2), META) == b.encode(sample(2), META)


def test_residual_decays_per_version_of_staleness() -> None:
    config = EncoderConfig(quant_bits=8, stochastic_rounding=False, error_feedback=True, ef_decay=0.5)
    encoder = UpdateEncoder(config, np.random.default_rng(0))
    encoder.encode(sample(1), META)
    r1 = encoder.residual()
    zeros = {n: np.zeros_like(a) for n, a in sample().items()}
    sent = decode_message(encoder.encode(zeros, META, staleness=2)).tensors
    for name, r in encoder.residual().items():
        np.testing.assert_allclose(sent[name] + r, 0.25 * r1[name], rtol=0, atol=1e-15)


def test_rollback_restores_the_residual() -> None:
    config = EncoderConfig(sparsify="topk", k=3, error_feedback=True)
    encoder = UpdateEncoder(config, np.random.default_rng(0))
    encoder.encode(sample(1), META)
    saved = encoder.state_dict()
    encoder.encode(sample(2), META)
    encoder.rollback()
    for key, arr in encoder.state_dict().items():
        np.testing.assert_array_equal(arr, saved[key])


# --- clipping and noise ------------------------------------------------------------------------


def _l2(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in tensors.values()))


@pytest.mark.parametrize("per_layer", [False, True])
def test_clip_bounds_the_norm(per_layer: bool) -> None:
    delta = {n: a * 100 for n, a in sample().items()}
    out = run(EncoderConfig(clip=2.0, per_layer_clip=per_layer), delta)
    assert _l2(out) <= 2.0 * (1 + 2**-23)
    if per_layer:
        for arr in out.values():
            assert _l2({"a": arr}) <= 2.0 / math.sqrt(3) * (1 + 2**-23)
    small = {n: a * 1e-3 for n, a in sample().items()}
    for name, arr in run(EncoderConfig(clip=2.0), small).items():
        np.testing.assert_array_equal(arr, small[name])  # within the bound: untouched


def test_l1_clip() -> None:
    out = run(EncoderConfig(clip=1.5, clip_ord=1), {n: a * 10 for n, a in sample().items()})
    assert sum(float(np.abs(a.astype(np.float64)).sum()) for a in out.values()) <= 1.5 * (1 + 2**-23)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("stochastic", [True, False])
def test_clip_bound_holds_after_quantization(bits: QuantBits, stochastic: bool) -> None:
    """Guarantee: ||decoded||_2 <= quantized_norm_bound(C, bits, chunk) =
    (1 + 2^-24) C (1 + c sqrt(chunk) / L), c = 2 stochastic / 1 deterministic; and
    ||decoded||_inf <= C (quantization never leaves [-s, s])."""
    chunk, clip = 16, 1.0
    for seed in range(5):
        delta = {n: a * 50 for n, a in sample(seed).items()}
        for sparsify in (None, "topk"):
            config = EncoderConfig(
                clip=clip,
                quant_bits=bits,
                chunk=chunk,
                stochastic_rounding=stochastic,
                sparsify=sparsify,
                density=0.3 if sparsify else None,
            )
            out = run(config, delta, seed=seed)
            assert _l2(out) <= quantized_norm_bound(clip, bits, chunk, stochastic)
            assert max(float(np.abs(a).max()) for a in out.values()) <= clip * (1 + 2**-23)


def test_noise_is_drawn_after_clipping_in_float64() -> None:
    delta = {n: a * 100 for n, a in sample().items()}
    config = EncoderConfig(clip=1.0, noise="gaussian", noise_multiplier=0.7)
    out = run(config, delta, seed=11)
    rng = np.random.default_rng(11)
    factor = 1.0 / _l2(delta)
    for name, a in delta.items():
        expected = a.astype(np.float64) * factor + 0.7 * rng.standard_normal(a.shape)
        np.testing.assert_allclose(out[name], expected.astype(np.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("noise", "std_factor"), [("gaussian", 1.0), ("laplace", math.sqrt(2))])
def test_noise_std_within_one_percent(noise: str, std_factor: float) -> None:
    n, clip, z = 1_000_000, 0.5, 1.3
    order = 2 if noise == "gaussian" else 1
    config = EncoderConfig.from_mapping(
        {"clip": clip, "clip_ord": order, "noise": noise, "noise_multiplier": z}
    )
    out = run(config, {"w": np.zeros(n, np.float32)}, seed=2)["w"].astype(np.float64)
    assert abs(out.std() / (std_factor * z * clip) - 1) < 0.01
    assert abs(out.mean()) < 5 * std_factor * z * clip / math.sqrt(n)


def test_noise_calibrated_from_epsilon() -> None:
    from fedfleet.protocol.privacy import Release, calibrate_noise_multiplier

    encoder = UpdateEncoder(
        EncoderConfig(clip=1.0, noise="gaussian", epsilon=2.0, delta=1e-5), np.random.default_rng(0)
    )
    assert encoder.noise_multiplier == pytest.approx(calibrate_noise_multiplier("gaussian", 2.0, 1e-5))
    assert encoder.noise_multiplier is not None
    assert encoder.release() == Release("gaussian", encoder.noise_multiplier)
    assert UpdateEncoder(EncoderConfig(), np.random.default_rng(0)).release() is None


# --- config and inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": -1.0}, "clip must be"),
        ({"noise": "gaussian", "noise_multiplier": 1.0}, "noise needs clip"),
        ({"clip": 1.0, "noise": "laplace", "noise_multiplier": 1.0}, "clip_ord=1"),
        ({"clip": 1.0, "noise": "gaussian"}, "either noise_multiplier"),
        (
            {"clip": 1.0, "noise": "gaussian", "noise_multiplier": 1.0, "epsilon": 1.0, "delta": 1e-5},
            "not both",
        ),
        ({"clip": 1.0, "noise": "gaussian", "epsilon": 1.0, "delta": 2.0}, "delta must be"),
        ({"sparsify": "topk"}, "exactly one of density"),
        ({"sparsify": "topk", "density": 1.5}, "density must be"),
        ({"sparsify": "randk", "k": 0}, "k must be"),
        ({"density": 0.1}, "sparsify is None"),
        ({"error_feedback": True}, "lossy step"),
        ({"sparsify": "randk", "k": 3, "error_feedback": True}, "randk_rescale=False"),
        ({"quant_bits": 3}, "quant_bits must be"),
        ({"quant_bits": 8, "chunk": 0}, "chunk must be"),
        ({"ef_decay": 1.5}, "ef_decay"),
        ({"per_layer_clip": True}, "per_layer_clip needs clip"),
        ({"quant_bits": 4, "quant_scale": "fit"}, "stochastic_rounding=False"),
        ({"quant_scale": "fit", "stochastic_rounding": False}, "quant_bits < 32"),
        ({"quant_bits": 4, "quant_scale": "mse"}, "quant_scale must be"),
    ],
)
def test_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)


def test_config_from_mapping() -> None:
    assert EncoderConfig.from_mapping({"quant_bits": 8, "chunk": 64}) == EncoderConfig(quant_bits=8, chunk=64)
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        EncoderConfig.from_mapping({"bits": 8})


def test_encoder_rejects_bad_input() -> None:
    encoder = UpdateEncoder(EncoderConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder.encode({"w": np.array([1.0, np.nan], np.float32)}, META)
    with pytest.raises(ValueError, match="staleness"):
        encoder.encode({"w": np.ones(2, np.float32)}, META, staleness=-1)
    with pytest.raises(ValueError, match="no error feedback"):
        encoder.load_state_dict({"residual/w": np.ones(2)})


def test_default_codec_shortcut_sends_the_pipelines_bytes() -> None:
    """The default codec (float32, no clip/noise/sparsify/feedback) skips the float64 pipeline;
    its messages are byte for byte what the pipeline makes, for float32, float64 (one
    rounding either way) and the int/NaN deltas it leaves to the pipeline. The header's
    remembered tensor list gives the same bytes as one built from scratch."""
    rng = np.random.default_rng(3)
    deltas = [sample(), {"a": rng.standard_normal((3, 5)), "b": np.float64(1e-40) * np.ones(4)},
              {"w": np.arange(6, dtype=np.int64).reshape(2, 3)}, {"s": np.array(2.5, np.float32)}]
    for compress in (False, True):
        fast = UpdateEncoder(EncoderConfig(compress=compress), np.random.default_rng(0))
        full = UpdateEncoder(EncoderConfig(compress=compress), np.random.default_rng(0))
        full._plain = False  # the whole pipeline
        assert fast._plain
        for delta in deltas * 2:  # twice: the second time the tensor list's JSON is remembered
            assert fast.encode(delta, META) == full.encode(delta, META)
    for bad in ({"w": np.array([1.0, np.inf])}, {"w": np.array([1.0, np.nan], np.float32)}):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fast.encode(bad, META)
    entries = [{"name": "w", "dtype": "float32", "shape": [2], "encoding": "quant", "bits": 8, "chunk": 256,
                "nbytes": 6}]
    assert canonical_header("update", META, entries) == canonical_header(
        "update", META, json.dumps(entries, separators=(",", ":")))
    assert not UpdateEncoder(EncoderConfig(quant_bits=8), np.random.default_rng(0))._plain


def test_dense_float32_nbytes() -> None:
    delta = sample()
    assert dense_float32_nbytes(delta) == 4 * sum(a.size for a in delta.values())
    assert dense_float32_nbytes({"a": TensorSpec((3, 4)), "b": (5,)}) == 4 * 17


# --- header compression (flag bit 1) ----------------------------------------------------------


def _parts(body: bytes) -> tuple[int, bytes, bytes]:
    """(flags, header bytes as transmitted, payload bytes as transmitted)."""
    (flags,) = struct.unpack_from("<H", body, 6)
    (header_len,) = struct.unpack_from("<I", body, 8)
    return flags, body[12 : 12 + header_len], body[16 + header_len : -4]


def cnn_delta(seed: int = 3) -> dict[str, np.ndarray]:
    """The shapes of the 20k-parameter CNN of the accuracy benchmark."""
    rng = np.random.default_rng(seed)
    shapes = {"conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,), "conv2.weight": (32, 16, 3, 3),
              "conv2.bias": (32,), "fc.weight": (10, 1568), "fc.bias": (10,)}
    return {n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


SPARSE_INT4: dict[str, Any] = {"sparsify": "topk", "density": 0.02, "quant_bits": 4, "error_feedback": True}


def test_compress_also_shrinks_the_header_and_decodes_the_same() -> None:
    delta = cnn_delta()
    plain = UpdateEncoder(EncoderConfig(**SPARSE_INT4), np.random.default_rng(5)).encode(delta, META)
    packed = UpdateEncoder(EncoderConfig(**SPARSE_INT4, compress=True), np.random.default_rng(5)).encode(delta, META)
    flags, header, _ = _parts(packed)
    _, plain_header, _ = _parts(plain)
    assert flags == FLAG_ZLIB | FLAG_ZLIB_HEADER
    assert zlib.decompress(header) == plain_header  # the same canonical JSON, compressed
    assert len(header) * 2 < len(plain_header)
    assert dense_float32_nbytes(delta) / len(packed) > 75  # 49x without compression
    specs = {n: TensorSpec(a.shape) for n, a in delta.items()}
    a, b = decode_message(plain, expected=specs), decode_message(packed, expected=specs)
    assert a.meta == b.meta == META
    for name in delta:
        np.testing.assert_array_equal(a.tensors[name], b.tensors[name])


def test_header_stays_plain_when_zlib_would_not_shrink_it() -> None:
    body = UpdateEncoder(EncoderConfig(compress=True), np.random.default_rng(0)).encode({}, {})
    flags, header, _ = _parts(body)
    assert flags == FLAG_ZLIB and header == b'{"kind":"update","meta":{},"tensors":[]}'  # zlib: 48 bytes
    assert decode_message(body).tensors == {}


@pytest.mark.parametrize("flags", [0, FLAG_ZLIB, FLAG_ZLIB_HEADER, FLAG_ZLIB | FLAG_ZLIB_HEADER])
def test_every_combination_of_the_zlib_flags_decodes(flags: int) -> None:
    """Messages from before the header flag (0 and 1) still decode, and each bit works alone."""
    delta = sample()
    _, header, payload = _parts(UpdateEncoder(EncoderConfig(), np.random.default_rng(0)).encode(delta, META))
    body = frame(
        zlib.compress(header) if flags & FLAG_ZLIB_HEADER else header,
        zlib.compress(payload) if flags & FLAG_ZLIB else payload,
        flags=flags,
    )
    msg = decode_message(body, expected={n: TensorSpec(a.shape) for n, a in delta.items()})
    assert msg.meta == META
    for name, arr in delta.items():
        np.testing.assert_array_equal(msg.tensors[name], arr)


def test_header_bomb_stops_at_one_mebibyte() -> None:
    padding = " " * (MAX_HEADER_BYTES + 1)  # JSON allows whitespace, and the cap counts it
    bomb = zlib.compress(('{"kind":"update","meta":{},"tensors":[]}' + padding).encode(), 9)
    assert len(bomb) < 2048
    with pytest.raises(MalformedMessage, match="at most 1048576 bytes"):
        decode_message(frame(bomb, b"", flags=FLAG_ZLIB_HEADER))
    # the same header just under the cap is accepted (the cap is on the inflated bytes)
    fits = zlib.compress(('{"kind":"update","meta":{},"tensors":[]}' + padding[:-100]).encode(), 9)
    assert decode_message(frame(fits, b"", flags=FLAG_ZLIB_HEADER)).tensors == {}


async def test_server_merges_a_header_compressed_update(make_server: MakeClient) -> None:
    """The real server over loopback: a sparse int4 update with both zlib flags is merged and
    moves the model by exactly what it decodes to; one with a broken header stream is a 400."""
    client = await make_server(sample_fraction=1.0, min_cohort=1)
    _, auth, task = await register(client, "z")
    await client.post("/v1/checkin", headers=auth)
    before = decode_message(await (await client.get("/v1/model", headers=auth)).read()).tensors
    delta = {p["name"]: np.random.default_rng(1).standard_normal(p["shape"]).astype(np.float32) for p in task["params"]}
    meta = {"update_id": "z1", "base_version": 0, "num_examples": 10, "train_loss": 1.0, "round": 1}
    encoder = UpdateEncoder(EncoderConfig(**SPARSE_INT4, compress=True), np.random.default_rng(2))
    body = encoder.encode(delta, meta)
    flags, header, payload = _parts(body)
    assert flags == FLAG_ZLIB | FLAG_ZLIB_HEADER
    broken = frame(header + b"\x00", payload, flags=flags)  # a byte after the header's zlib stream
    resp = await client.post("/v1/update", data=broken, headers=auth)
    assert resp.status == 400 and (await resp.json())["error"] == "malformed", await resp.text()
    resp = await client.post("/v1/update", data=body, headers=auth)
    assert resp.status == 200, await resp.text()
    after = decode_message(await (await client.get("/v1/model", headers=auth)).read())
    assert after.meta["version"] == 1
    sent = decode_message(body).tensors
    for name, arr in sent.items():
        np.testing.assert_allclose(after.tensors[name] - before[name], arr, rtol=1e-5, atol=1e-7)
