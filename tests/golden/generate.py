"""Write the golden vectors of wire format v1 (see README.md here and protocol/FORMAT.md).

Run once when the format changes on purpose: ``.venv/bin/python tests/golden/generate.py``.
tests/test_wire.py never regenerates: it checks today's code against the stored files.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.protocol import EncoderConfig, UpdateEncoder, decode_message, encode_message
from fedfleet.protocol.wire import FLAG_ZLIB, FLAG_ZLIB_HEADER, frame

HERE = Path(__file__).parent
META = {"update_id": "phone-7/42", "base_version": 3, "num_examples": 128, "train_loss": 0.6931, "round": 5}


def tensor_json(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "shape": list(arr.shape), "dtype": arr.dtype.name, "values": arr.ravel().tolist()}


def f32(values: list[float], shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.array(values, dtype=np.float32)
    return arr.reshape(shape) if shape is not None else arr


def encoder_vector(
    name: str, kind: str, description: str, config: dict[str, Any], steps: list[dict[str, Any]], seed: int = 0
) -> dict[str, Any]:
    encoder = UpdateEncoder(EncoderConfig(**config), np.random.default_rng(seed))
    out_steps = []
    for step in steps:
        meta = step.get("meta", META)
        body = encoder.encode(step["inputs"], meta, staleness=step.get("staleness", 0), state=step.get("state"))
        decoded = decode_message(body).tensors
        out: dict[str, Any] = {
            "meta": meta,
            "staleness": step.get("staleness", 0),
            "inputs": [tensor_json(n, a) for n, a in step["inputs"].items()],
        }
        if "state" in step:  # the model's state after training (FORMAT.md section 11)
            out["state"] = [tensor_json(n, a) for n, a in step["state"].items()]
        out_steps.append({**out, "message_hex": body.hex(), "decoded": [tensor_json(n, a) for n, a in decoded.items()]})
    return {
        "name": name,
        "type": kind,
        "description": description,
        "seed": seed,
        "config": config,
        "steps": out_steps,
    }


def encode_vectors() -> list[dict[str, Any]]:
    ramp = f32([-1.5, -0.75, -0.1, 0.0, 0.05, 0.3, 0.7, 1.0, 1.25, -2.0])
    wide = np.zeros(200, dtype=np.float32)
    wide[[3, 130, 199]] = [0.5, -2.25, 1.0]
    wide[[10, 11, 150]] = [0.125, -0.0625, 0.25]
    ties = f32([1, -1, 0.5, -0.5, 1, 0.25, -1, 0.5, 0, 2, -0.25, 0.5, 0.75, -0.75, 1, 0], (4, 4))
    return [
        encoder_vector(
            "dense_float32",
            "encode",
            "No steps: every tensor dense float32.",
            {},
            [
                {
                    "inputs": {
                        "layer.weight": f32([0.5, -1.25, 3.0, 0.1, -0.2, 1e-3], (2, 3)),
                        "layer.bias": f32([0.0, -0.0, 7.5]),
                    }
                }
            ],
        ),
        *[
            encoder_vector(
                f"quant{bits}_deterministic",
                "encode",
                f"{bits}-bit quantization, round half up, chunk 4 (last chunk partial), an all-zero chunk.",
                {"quant_bits": bits, "stochastic_rounding": False, "chunk": 4},
                [{"inputs": {"w": ramp, "z": np.zeros(3, dtype=np.float32)}}],
            )
            for bits in (8, 4, 2, 1)
        ],
        encoder_vector(
            "topk_varint_float32",
            "encode",
            "Top-3 of 200 as float32: delta-varint index coding (3 bytes) beats the bitmap (25 bytes).",
            {"sparsify": "topk", "k": 3},
            [{"inputs": {"emb": wide}}],
        ),
        encoder_vector(
            "topk_bitmap_quant4_ties",
            "encode",
            "Top-k of a 4x4 tensor, density 0.45 -> k = floor(0.45 * 16 + 0.5) = 7, with a tie at the threshold "
            "(lower index wins), 4-bit deterministic, chunk 3: bitmap coding.",
            {"sparsify": "topk", "density": 0.45, "quant_bits": 4, "stochastic_rounding": False, "chunk": 3},
            [{"inputs": {"conv": ties}}],
        ),
        encoder_vector(
            "clip_l2_exact",
            "encode",
            "L2 clip to 1.0 of an update of norm exactly 13: x * (C / norm), then float32.",
            {"clip": 1.0},
            [{"inputs": {"a": f32([3.0, 4.0]), "b": f32([12.0])}}],
        ),
        encoder_vector(
            "clip_per_layer_l1",
            "encode",
            "Per-layer L1 clip, C = 2 over 2 tensors: each to 1.0 (dyadic values, exact norms).",
            {"clip": 2.0, "per_layer_clip": True, "clip_ord": 1},
            [{"inputs": {"a": f32([0.5, -1.5, 2.0]), "b": f32([0.25, 0.5])}}],
        ),
        encoder_vector(
            "state_after_topk_quant4",
            "encode",
            "A batch norm model's update (FORMAT.md section 11): clip 1.0, top-2, 4-bit deterministic "
            "(chunk 4), then the state appended as it is: float32 running statistics (beyond the clip, "
            "-0.0 kept) and an int64 counter, dense, never clipped or quantized. Two updates.",
            {"clip": 1.0, "sparsify": "topk", "k": 2, "quant_bits": 4, "stochastic_rounding": False, "chunk": 4},
            [
                {
                    "inputs": {"bn.weight": f32([0.5, -2.0, 0.125]), "fc.weight": f32([3.0, -0.25, 0.0, 1.5], (2, 2))},
                    "state": {
                        "bn.running_mean": f32([0.1, -0.0, 12.5]),
                        "bn.running_var": f32([1.0, 0.333333343267, 2.5e-7]),
                        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
                    },
                },
                {
                    "inputs": {"bn.weight": f32([0.0, 0.0, 0.0]), "fc.weight": f32([0.0, 0.0, -0.5, 0.0], (2, 2))},
                    "state": {
                        "bn.running_mean": f32([0.2, -1.0, 11.0]),
                        "bn.running_var": f32([0.9, 0.25, 3.0]),
                        "bn.num_batches_tracked": np.array(2**40 + 3, dtype=np.int64),
                    },
                },
            ],
        ),
        encoder_vector(
            "error_feedback_sequence",
            "encode",
            "Top-2 + 8-bit deterministic (chunk 4) with error feedback, decay 0.5: three updates, "
            "the last one 1 version stale. Each message depends on the residual of the ones before.",
            {
                "sparsify": "topk",
                "k": 2,
                "quant_bits": 8,
                "stochastic_rounding": False,
                "chunk": 4,
                "error_feedback": True,
                "ef_decay": 0.5,
            },
            [
                {"inputs": {"w": f32([0.5, -0.25, 0.125, 1.0, -0.75, 0.3])}},
                {"inputs": {"w": f32([0.1, 0.2, -0.3, 0.0, 0.05, -0.6])}},
                {"inputs": {"w": f32([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])}, "staleness": 1},
            ],
        ),
    ]


def decode_vectors() -> list[dict[str, Any]]:
    rng = np.random.default_rng(2024)
    x = rng.standard_normal(24).astype(np.float32)
    y = rng.standard_normal((5, 8)).astype(np.float32)
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("quant8_stochastic", "8-bit stochastic rounding, chunk 8.", {"quant_bits": 8, "chunk": 8}),
        (
            "randk_quant2_stochastic",
            "Rand-k (density 0.25, rescaled by n/k), 2-bit stochastic, chunk 4.",
            {"sparsify": "randk", "density": 0.25, "quant_bits": 2, "chunk": 4},
        ),
        (
            "gaussian_topk_quant4",
            "L2 clip 1, Gaussian noise z = 0.5, top-25%, 4-bit stochastic, chunk 16.",
            {
                "clip": 1.0,
                "noise": "gaussian",
                "noise_multiplier": 0.5,
                "sparsify": "topk",
                "density": 0.25,
                "quant_bits": 4,
                "chunk": 16,
            },
        ),
        (
            "dense_zlib",
            "Dense float32 with both zlib flags (payload, and the header, which compresses).",
            {"compress": True},
        ),
        (
            "topk_ef_quant4_zlib",
            "Top-25% with error feedback, 4-bit stochastic, chunk 4, both zlib flags: a small sparse "
            "update, whose header is most of its bytes until it is compressed.",
            {
                "sparsify": "topk",
                "density": 0.25,
                "error_feedback": True,
                "quant_bits": 4,
                "chunk": 4,
                "compress": True,
            },
        ),
        (
            "laplace_quant1_zlib",
            "L1 clip 2, Laplace z = 1, 1-bit stochastic, chunk 8, zlib.",
            {
                "clip": 2.0,
                "clip_ord": 1,
                "noise": "laplace",
                "noise_multiplier": 1.0,
                "quant_bits": 1,
                "chunk": 8,
                "compress": True,
            },
        ),
    ]
    return [
        encoder_vector(
            name,
            "decode",
            desc + " Not reproducible outside numpy: decode only.",
            cfg,
            [{"inputs": {"x": x, "y": y}}],
            seed=7,
        )
        for name, desc, cfg in specs
    ]


def message_vectors() -> list[dict[str, Any]]:
    meta = {
        "version": 12,
        "model": 'cnn-\u00e9t\u00e9 \U0001f600 "q" \\ /\n\t\u0001\u007f',
        "floats": [
            0.1,
            1e-05,
            0.0001,
            1e16,
            1e15,
            -0.0,
            5e-324,
            1.7976931348623157e308,
            123.456,
            2.5e-07,
            100.0,
        ],
        "nested": {"z": None, "a": True, "m": [1, -2, {"y": False, "b": 9007199254740991}]},
    }
    tensors: dict[str, np.ndarray] = {
        "w64": np.array([[1.5, -2.0]], dtype=np.float64),
        "h16": np.array([0.5, -0.25, 65504.0], dtype=np.float16),
        "i32": np.array([1, -2, 2147483647], dtype=np.int32),
        "i64": np.array([[-(2**40)]], dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(2.0, dtype=np.float32),
    }
    body = encode_message("model", meta, tensors)
    return [
        {
            "name": "model_canonical_header",
            "type": "encode_message",
            "description": "A model message: meta keys sorted recursively, escapes, float formatting, every dtype, "
            "an empty and a 0-d tensor.",
            "kind": "model",
            "meta": meta,
            "inputs": [tensor_json(n, a) for n, a in tensors.items()],
            "message_hex": body.hex(),
        }
    ]


def _split(body: bytes) -> tuple[dict[str, Any], bytes]:
    (header_len,) = struct.unpack_from("<I", body, 8)
    header = json.loads(body[12 : 12 + header_len])
    return header, body[16 + header_len : -4]


def _reheader(body: bytes, edit: Any, payload: bytes | None = None, flags: int = 0) -> bytes:
    header, old_payload = _split(body)
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return frame(raw, old_payload if payload is None else payload, flags=flags)


def invalid_vectors() -> list[dict[str, Any]]:
    x = np.array([0.5, -1.0, 0.25, 2.0, 0.0, 1.5, -0.5, 0.75, 1.0, -2.0], dtype=np.float32)
    quant = UpdateEncoder(
        EncoderConfig(quant_bits=2, chunk=4, stochastic_rounding=False), np.random.default_rng(0)
    )
    q_body = quant.encode({"w": x}, META)
    sparse = UpdateEncoder(EncoderConfig(sparsify="topk", k=3), np.random.default_rng(0))
    s_body = sparse.encode({"w": np.concatenate([x, np.zeros(90, np.float32)])}, META)  # varint coding
    bitmap = UpdateEncoder(EncoderConfig(sparsify="topk", k=5), np.random.default_rng(0)).encode(
        {"w": x}, META
    )
    dense = encode_message("update", META, {"w": x})
    _, q_payload = _split(q_body)
    _, s_payload = _split(s_body)
    _, b_payload = _split(bitmap)
    _, d_payload = _split(dense)

    def set_(**values: Any) -> Any:
        return lambda h: h["tensors"][0].update(values)

    cases: list[tuple[str, str, bytes]] = [
        ("bad_crc", "checksum", dense[:-1] + bytes([dense[-1] ^ 1])),
        ("truncated", "checksum", dense[:-7]),
        (
            "bad_magic",
            "malformed",
            b"FFLX" + dense[4:-4] + struct.pack("<I", zlib.crc32(b"FFLX" + dense[4:-4])),
        ),
        ("version_2", "unsupported_version", frame(*_frame_parts(dense), version=2)),
        ("unknown_flag", "malformed", frame(*_frame_parts(dense), flags=4)),
        ("header_flag_plain_json", "malformed", frame(*_frame_parts(dense), flags=FLAG_ZLIB_HEADER)),
        (
            "header_zlib_trailing_bytes",
            "malformed",
            frame(zlib.compress(_frame_parts(dense)[0]) + b"\x00", _frame_parts(dense)[1], flags=FLAG_ZLIB_HEADER),
        ),
        (
            "header_zlib_not_json",
            "malformed",
            frame(zlib.compress(b"{not json"), b"", flags=FLAG_ZLIB_HEADER),
        ),
        ("unknown_encoding", "unsupported_encoding", _reheader(dense, set_(encoding="lz4"))),
        ("nbytes_wrong", "malformed", _reheader(dense, set_(nbytes=36))),
        ("bits_3", "malformed", _reheader(q_body, set_(bits=3))),
        ("chunk_0", "malformed", _reheader(q_body, set_(chunk=0))),
        (
            "scale_negative",
            "malformed",
            _reheader(q_body, lambda h: None, struct.pack("<f", -1.0) + q_payload[4:]),
        ),
        (
            "scale_nan",
            "non_finite",
            _reheader(q_body, lambda h: None, struct.pack("<f", float("nan")) + q_payload[4:]),
        ),
        (
            "padding_bits_set",
            "malformed",
            _reheader(q_body, lambda h: None, q_payload[:-1] + bytes([q_payload[-1] | 0xF0])),
        ),
        (
            "varint_duplicate_index",
            "malformed",
            _reheader(s_body, lambda h: None, s_payload[:1] + b"\x00" + s_payload[2:]),
        ),
        ("varint_out_of_range", "malformed", _reheader(s_body, set_(shape=[4]))),
        (
            "varint_overlong",
            "malformed",
            _reheader(s_body, set_(nbytes=len(s_payload) + 1), s_payload[:1] + b"\x81\x00" + s_payload[2:]),
        ),
        (
            "bitmap_popcount",
            "malformed",
            _reheader(bitmap, set_(nnz=4, nbytes=len(b_payload) - 4), b_payload[:2] + b_payload[6:]),
        ),
        (
            "float_values_inf",
            "non_finite",
            _reheader(dense, lambda h: None, struct.pack("<f", float("inf")) + d_payload[4:]),
        ),
        (
            "duplicate_json_key",
            "malformed",
            frame(b'{"kind":"update","kind":"update","meta":{},"tensors":[]}', b""),
        ),
        ("extra_header_key", "malformed", _reheader(dense, lambda h: h.__setitem__("extra", 1))),
        ("extra_tensor_key", "malformed", _reheader(dense, set_(scale=1.0))),
        (
            "zlib_inflates_larger",
            "malformed",
            _reheader(dense, set_(shape=[9], nbytes=36), zlib.compress(d_payload), flags=FLAG_ZLIB),
        ),
        (
            "zlib_trailing_bytes",
            "malformed",
            _reheader(dense, lambda h: None, zlib.compress(d_payload) + b"\x00", flags=FLAG_ZLIB),
        ),
        ("quant_float64_dtype", "malformed", _reheader(q_body, set_(dtype="float64"))),
        ("header_not_json", "malformed", frame(b"{not json", b"")),
    ]
    for name, _, body in cases:  # a vector that decodes is a bug in this list
        try:
            decode_message(body)
        except ValueError:
            continue
        raise AssertionError(f"invalid vector {name} decodes")
    return [
        {"name": f"invalid_{name}", "type": "invalid", "error": reason, "message_hex": body.hex()}
        for name, reason, body in cases
    ]


def _frame_parts(body: bytes) -> tuple[bytes, bytes]:
    (header_len,) = struct.unpack_from("<I", body, 8)
    return body[12 : 12 + header_len], body[16 + header_len : -4]


def main() -> None:
    vectors = encode_vectors() + decode_vectors() + message_vectors() + invalid_vectors()
    for old in HERE.glob("*.json"):
        old.unlink()
    for v in vectors:
        text = json.dumps(v, indent=1, ensure_ascii=False)
        # lists of numbers on one line: readable diffs without a value per line
        text = re.sub(
            r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text
        )
        (HERE / f"{v['name']}.json").write_text(text + "\n")
    print(f"wrote {len(vectors)} vectors to {HERE}")


if __name__ == "__main__":
    main()
