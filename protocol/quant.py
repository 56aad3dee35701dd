"""Uniform quantization with per-chunk scales, and its "quant" wire encoding.

A chunk of float32 values x with scale s = max|x| maps to codes q in [0, L], L = 2**bits - 1,
on the grid x_hat = s * (2q - L) / L (2**bits evenly spaced levels from -s to s). With
stochastic rounding, q = floor(u + r) with u = (x/s + 1) * L / 2 and r ~ U[0, 1), so
E[x_hat] = x: the unbiased quantizer of QSGD (Alistarh et al., 2017, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding") with an
infinity-norm scale per chunk, as in TernGrad (Wen et al., 2017). Deterministic
rounding (q = floor(u + 1/2)) is biased but reproducible byte for byte in any language.

Error bound (used by the tests): |x_hat - x| < 2s/L per element (stochastic) or <= s/L
(deterministic), and |x_hat| <= s, so quantization never grows the infinity norm.

The arithmetic order below is normative (FORMAT.md section "quant"): every step is one
IEEE-754 binary64 operation, so Java and JavaScript reproduce the same codes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedfleet.protocol.errors import MalformedMessage, NonFiniteValues
from fedfleet.protocol.packing import BIT_WIDTHS, Blob, pack_codes, packed_nbytes, unpack_codes

MAX_CHUNK = 1 << 24
F32 = np.dtype("<f4")


def levels(bits: int) -> int:
    return (1 << bits) - 1


def num_chunks(count: int, chunk: int) -> int:
    return -(-count // chunk)


def quant_nbytes(count: int, bits: int, chunk: int) -> int:
    """Size of a quantized section: float32 scales, then packed codes."""
    return 4 * num_chunks(count, chunk) + packed_nbytes(count, bits)


def _chunked(x: np.ndarray, chunk: int, dtype: type[np.generic] = np.float64) -> np.ndarray:
    """(n,) -> a new (num_chunks, chunk) array of ``dtype``, zero-padded: padding changes
    neither max|x| nor the codes kept. One pass: the copy is also the conversion."""
    rows = num_chunks(x.size, chunk)
    out: np.ndarray = np.empty((rows, chunk), dtype=dtype)
    flat = out.reshape(-1)
    flat[: x.size] = x
    flat[x.size :] = 0
    return out


def quantize(
    values: np.ndarray, bits: int, chunk: int, rng: np.random.Generator | None,
    scales: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """values (n,) float32 -> (scales (num_chunks,) float32, codes (n,) uint8).
    ``rng`` None means deterministic rounding; otherwise one U[0,1) draw per element.
    ``scales`` None: s = max|x| per chunk (FORMAT.md); else these float32 scales (from
    ``fit_scales``), with values beyond a chunk's scale clamped to the outermost level."""
    x32 = np.asarray(values, dtype=np.float32).reshape(-1)
    n = x32.size
    if n == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8)
    u = _chunked(x32, chunk)  # float32 values are exact in float64
    fitted = scales is not None
    if scales is None:
        # max|x| (exactly a float32 value) without an |x| temporary; abs() turns -0.0 into +0.0
        scales = np.abs(np.maximum(u.max(axis=1), -u.min(axis=1)))
    else:
        scales = np.asarray(scales, dtype=np.float32).astype(np.float64)
    zero = scales == 0
    lv = levels(bits)
    # in place, binary64, as FORMAT.md orders it: t = x / s, u = ((t + 1) * L) * 0.5, which
    # equals (t + 1) * (L / 2) exactly (halving commutes with rounding); an all-zero chunk
    # divides by 1 and is zeroed below
    u /= np.where(zero, 1.0, scales)[:, None]
    u += 1.0
    u *= lv / 2
    if rng is None:
        u += 0.5
    else:
        r = np.empty_like(u)
        rng.random(out=r.reshape(-1)[:n])  # drawn in element order, straight into chunk layout
        r.reshape(-1)[n:] = 0
        u += r
    # |x| <= s keeps u in [0, L], but u + r can round up to L + 1 when u = L and r is within
    # an ulp of 1: FORMAT.md's clamp. With s = max|x| the lower bound cannot be crossed; a
    # fitted scale below max|x| crosses both, and the clamp maps x to the outermost level.
    np.floor(u, out=u)
    if fitted:
        np.clip(u, 0, lv, out=u)
    else:
        np.minimum(u, lv, out=u)
    u[zero] = 0  # an all-zero chunk has code 0 throughout (canonical form)
    return scales.astype(np.float32), u.reshape(-1)[:n].astype(np.uint8)


FIT_ITERATIONS = 12


def fit_scales(values: np.ndarray, bits: int, chunk: int, iterations: int = FIT_ITERATIONS) -> np.ndarray:
    """Per-chunk float32 scales that lower the squared error of *deterministic* rounding
    below that of s = max|x| (never above it), by alternating minimisation (Lloyd, 1982,
    restricted to the uniform grid x_hat = s * g, g = (2q - L) / L): with s fixed, rounding
    to the nearest level is the best assignment; with the assignment fixed, the best scale
    is the least-squares s = <x, g> / <g, g>. Neither step raises the error, so it only
    falls from max|x|. At 1 bit one step gives s = mean|x| and x_hat = sign(x) * mean|x|,
    the ternary code of sparse ternary compression (STC: Sattler et al., 2019, "Robust and
    Communication-Efficient Federated Learning from Non-IID Data").

    Biased (values beyond s are clamped), like deterministic rounding itself: meant for
    updates under error feedback, which carries the error to the next update; stochastic
    rounding needs s >= max|x| to stay unbiased. The decoder is unchanged (a scale is a scale)."""
    x32 = np.asarray(values, dtype=np.float32).reshape(-1)
    n = x32.size
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    x = _chunked(x32, chunk)
    real = _chunked(np.ones(n), chunk)  # 1 on real elements, 0 on the padding
    lv = levels(bits)
    max_scale = np.abs(x).max(axis=1)

    def grid(s: np.ndarray) -> np.ndarray:  # g = (2q - L) / L of the nearest level, 0 on padding
        safe = np.where(s > 0, s, 1.0)[:, None]
        q = np.clip(np.floor((x / safe + 1.0) * lv * 0.5 + 0.5), 0, lv)
        return (2.0 * q - lv) / lv * real

    def sq_error(s: np.ndarray) -> np.ndarray:
        return (((s[:, None] * grid(s)) - x) ** 2 * real).sum(axis=1)

    s = max_scale.copy()
    for _ in range(iterations):
        g = grid(s)
        num, den = (x * g).sum(axis=1), (g * g).sum(axis=1)
        s = np.where((num > 0) & (den > 0), num / np.where(den > 0, den, 1.0), s)
    fitted = s.astype(np.float32).astype(np.float64)  # the scale as sent
    better = sq_error(fitted) < sq_error(max_scale)
    return np.where(better, fitted, max_scale).astype(np.float32)


def dequantize(scales: np.ndarray, codes: np.ndarray, bits: int, chunk: int) -> np.ndarray:
    """x_hat = float32((s * (2q - L)) / L) in binary64: the decoder's formula, also used by
    the encoder to keep the error-feedback residual exactly what the server did not get."""
    n = codes.size
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    lv = levels(bits)
    # 2q - L for every possible code, then a table lookup: exact, and cheaper than arithmetic
    table = 2.0 * np.arange(lv + 1, dtype=np.float64) - lv
    out = table[_chunked(codes, chunk, np.uint8)]
    out *= scales.astype(np.float64)[:, None]
    out /= lv
    return out.reshape(-1)[:n].astype(np.float32)


def quantized_norm_bound(norm: float, bits: int, chunk: int, stochastic: bool = True) -> float:
    """Bound on ||x_hat||_2 for any x with ||x||_2 <= norm, quantized in chunks of ``chunk``.

    ||x_hat|| <= ||x32|| + ||x_hat - x32|| and ||x32|| <= (1 + 2**-24) ||x|| (rounding to
    float32). Per element |x_hat - x32| < c * s_c / L (c = 2 stochastic, 1 deterministic)
    with s_c = max|x| of its chunk <= ||x_c||_2, so ||x_hat - x32||**2 <= (c/L)**2 *
    sum_c n_c s_c**2 <= (c/L)**2 * chunk * ||x32||**2. Hence
    ||x_hat|| <= (1 + 2**-24) * norm * (1 + c * sqrt(chunk) / L). The bound holds per draw,
    not only on average, so a clipped update stays within it after quantization."""
    c = 2.0 if stochastic else 1.0
    return (1.0 + 2.0**-24) * norm * (1.0 + c * math.sqrt(chunk) / levels(bits))


def encode_section(scales: np.ndarray, codes: np.ndarray, bits: int) -> bytes:
    return scales.astype(F32).tobytes() + pack_codes(codes, bits)


def decode_section(blob: Blob, count: int, bits: int, chunk: int) -> np.ndarray:
    """Scales, then codes, for ``count`` values -> float32 (count,)."""
    ns = num_chunks(count, chunk)
    if len(blob) != quant_nbytes(count, bits, chunk):
        raise MalformedMessage(
            f"{count} values at {bits} bits in chunks of {chunk} need {quant_nbytes(count, bits, chunk)} bytes, "
            f"got {len(blob)}"
        )
    scales = np.frombuffer(blob[: 4 * ns], dtype=F32)
    if not np.isfinite(scales).all():
        raise NonFiniteValues("quantization scale is NaN or Inf")
    if np.signbit(scales).any():
        raise MalformedMessage("quantization scales must be non-negative (sign bit clear)")
    codes = unpack_codes(blob[4 * ns :], count, bits)
    return dequantize(scales, codes, bits, chunk)


def check_quant_params(fields: dict[str, Any]) -> tuple[int, int]:
    """Validate the "bits" and "chunk" header keys of a quantized section."""
    bits, chunk = fields.get("bits"), fields.get("chunk")
    if type(bits) is not int or bits not in BIT_WIDTHS:
        raise MalformedMessage(f"bits must be one of {list(BIT_WIDTHS)}, got {bits!r}")
    if type(chunk) is not int or not 1 <= chunk <= MAX_CHUNK:
        raise MalformedMessage(f"chunk must be an int in [1, {MAX_CHUNK}], got {chunk!r}")
    return bits, chunk
