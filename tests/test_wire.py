"""Wire format v1: container round trips, canonical header, strict validation, golden
vectors byte for byte, and a fuzzed decoder that only ever raises ProtocolError."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfleet.protocol import (
    EncoderConfig,
    MalformedMessage,
    ProtocolError,
    ShapeMismatch,
    TensorSpec,
    UpdateEncoder,
    check_update_meta,
    decode_message,
    encode_message,
)
from fedfleet.protocol.canonical import canonical_meta
from fedfleet.protocol.packing import (
    decode_bitmap,
    decode_delta_varint,
    encode_bitmap,
    encode_delta_varint,
    pack_codes,
    unpack_codes,
)
from fedfleet.protocol.wire import FLAG_ZLIB, FLAG_ZLIB_HEADER, frame

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))
META = {"update_id": "u-9", "base_version": 2, "num_examples": 10, "train_loss": None, "round": 0}
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def split(body: bytes) -> tuple[dict[str, Any], bytes, int]:
    """(header as plain JSON, payload, flags without the header flag, for re-framing)."""
    (header_len,) = struct.unpack_from("<I", body, 8)
    (flags,) = struct.unpack_from("<H", body, 6)
    header = body[12 : 12 + header_len]
    if flags & FLAG_ZLIB_HEADER:
        header = zlib.decompress(header)
    return json.loads(header), body[16 + header_len : -4], flags & ~FLAG_ZLIB_HEADER


def tensors_of(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {t["name"]: np.array(t["values"], dtype=t["dtype"]).reshape(t["shape"]) for t in items}


def assert_same_values(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:  # bitwise: -0.0 and +0.0 differ
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes(), name


# --- container ---------------------------------------------------------------------------------


def test_every_dtype_round_trips() -> None:
    tensors = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f64": np.array([1e300, -2.5]),
        "f16": np.array([0.5, 65504], dtype=np.float16),
        "i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "i64": np.array([[2**62]], dtype=np.int64),
        "scalar": np.array(1.5, dtype=np.float32),
    }
    for compress in (False, True):
        msg = decode_message(encode_message("model", {"version": 3}, tensors, compress=compress))
        assert msg.kind == "model" and msg.meta == {"version": 3}
        assert_same_values(msg.tensors, tensors)


def test_repeated_tensor_lists_are_still_checked_message_by_message() -> None:
    """Validated tensor lists are remembered (a federation repeats one model's list) and a
    message of dense tensors of one dtype is decoded in one pass: neither lets through what
    the full checks refuse, nor mixes up look-alike lists."""
    w, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5, -2.0], np.float32)
    good = encode_message("update", META, {"w": w, "b": b})
    for _ in range(2):  # the second decode takes the remembered list and the one-pass path
        msg = decode_message(good)
        assert_same_values(msg.tensors, {"w": w, "b": b})
        assert msg.encodings == {"w": "dense", "b": "dense"}
    msg.tensors["w"][0, 0] = 99.0  # each tensor owns its values: no view of the message or of the other
    assert msg.tensors["b"].tolist() == [1.5, -2.0] and decode_message(good).tensors["w"][0, 0] == 0.0
    header, payload, _ = split(good)
    nan = payload[:-4] + np.array([np.nan], np.float32).tobytes()  # the same list, NaN in the last value of b
    with pytest.raises(ProtocolError, match="tensor 'b'.*NaN"):
        decode_message(frame(json.dumps(header).encode(), nan))
    for edit in ({"shape": [2.0, 3]}, {"shape": [3, 2], "nbytes": 25}, {"name": "b"}, {"dtype": "float64"}):
        bad = json.loads(json.dumps(header))
        bad["tensors"][0].update(edit)  # a float dimension, a size that disagrees, a repeated name, a dtype
        for _ in range(2):
            with pytest.raises(ProtocolError):
                decode_message(frame(json.dumps(bad).encode(), payload))
    mixed: dict[str, np.ndarray] = {"f": w, "i": np.array([7, -7], np.int64), "h": np.array([0.5], np.float16)}
    assert_same_values(decode_message(encode_message("model", {}, mixed)).tensors, mixed)


def test_canonical_meta_sorts_and_refuses_what_json_cannot_carry() -> None:
    assert list(canonical_meta({"b": 1, "a": {"d": 2, "c": np.float32(0.5)}})) == ["a", "b"]
    assert canonical_meta({"x": (np.int64(3), [np.bool_(True)])}) == {"x": [3, [True]]}
    bads: list[dict[Any, Any]] = [{"x": float("nan")}, {"x": 2**53}, {1: "a"}, {"x": object()}]
    for bad in bads:
        with pytest.raises(ValueError):
            encode_message("model", bad, {})


def test_expected_specs_are_checked_before_the_payload() -> None:
    body = encode_message("update", META, {"w": np.ones((2, 2), np.float32)})
    header, payload, _ = split(body)
    broken = frame(json.dumps(header).encode(), payload[:-1] + b"\xff")  # payload is bad too
    with pytest.raises(ShapeMismatch):
        decode_message(broken, expected={"w": TensorSpec((4,))})
    with pytest.raises(ShapeMismatch):
        decode_message(body, expected={"w": TensorSpec((2, 2)), "b": TensorSpec((2,))})
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        decode_message(body, max_bytes=len(body) - 1)


def test_compression_bomb_stops_at_the_declared_size() -> None:
    header = {
        "kind": "update",
        "meta": {},
        "tensors": [{"name": "w", "dtype": "float32", "shape": [4], "encoding": "dense", "nbytes": 16}],
    }
    bomb = frame(json.dumps(header).encode(), zlib.compress(bytes(64 << 20), 9), flags=FLAG_ZLIB)
    assert len(bomb) < 100_000
    with pytest.raises(MalformedMessage, match="inflate"):
        decode_message(bomb)


def test_update_meta_check() -> None:
    check_update_meta(META)
    check_update_meta({**META, "train_loss": 0.5, "device_class": "low"})
    for bad in (
        {**META, "num_examples": 0},
        {**META, "base_version": True},
        {**META, "train_loss": "x"},
        {"round": 1},
    ):
        with pytest.raises(MalformedMessage):
            check_update_meta(bad)


# --- bit packing and index coding ------------------------------------------------------------------


@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
@settings(max_examples=100, deadline=None, database=None)
def test_code_packing_round_trips(bits: int, data: st.DataObject) -> None:
    codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70)), dtype=np.uint8)
    blob = pack_codes(codes, bits)
    assert len(blob) == (codes.size * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(blob, codes.size, bits), codes)


@given(st.sets(st.integers(0, 2**22 - 1), max_size=60))
@settings(max_examples=100, deadline=None, database=None)
def test_index_codings_round_trip(index_set: set[int]) -> None:
    indices = np.array(sorted(index_set), dtype=np.int64)
    np.testing.assert_array_equal(
        decode_delta_varint(encode_delta_varint(indices), 2**22, indices.size), indices
    )
    small = indices[indices < 300]
    np.testing.assert_array_equal(decode_bitmap(encode_bitmap(small, 300), 300, small.size), small)


def test_varint_byte_layout() -> None:
    # gaps 0, 127, 128, 16384, 2**21: 1, 1, 2, 3 and 4 bytes, low group first
    indices = np.cumsum([0, 127, 128, 16384, 2**21])
    assert encode_delta_varint(indices).hex() == "007f800180800180808001"


# --- golden vectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_vector(path: Path) -> None:
    vector = json.loads(path.read_text())
    kind = vector["type"]
    if kind == "invalid":
        with pytest.raises(ProtocolError) as info:
            decode_message(bytes.fromhex(vector["message_hex"]))
        assert info.value.reason == vector["error"]
        return
    if kind == "encode_message":
        body = encode_message(vector["kind"], vector["meta"], tensors_of(vector["inputs"]))
        assert body.hex() == vector["message_hex"]
        assert_same_values(decode_message(body).tensors, tensors_of(vector["inputs"]))
        return
    encoder = UpdateEncoder(EncoderConfig(**vector["config"]), np.random.default_rng(vector["seed"]))
    for step in vector["steps"]:
        expected = bytes.fromhex(step["message_hex"])
        decoded = decode_message(expected)
        assert decoded.meta == step["meta"]
        assert_same_values(decoded.tensors, tensors_of(step["decoded"]))
        # both types re-encode identically here; only "encode" promises it in other languages
        state = tensors_of(step["state"]) if "state" in step else None  # FORMAT.md section 11
        body = encoder.encode(tensors_of(step["inputs"]), step["meta"], staleness=step["staleness"], state=state)
        assert body == expected


def test_golden_set_is_complete() -> None:
    kinds = {json.loads(p.read_text())["type"] for p in GOLDEN}
    assert kinds == {"encode", "decode", "encode_message", "invalid"} and len(GOLDEN) >= 30


# --- fuzzing ------------------------------------------------------------------------------------------


def _valid_messages() -> list[bytes]:
    rng = np.random.default_rng(0)
    delta = {
        "w": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }
    configs = [
        EncoderConfig(),
        EncoderConfig(quant_bits=2, chunk=4),
        EncoderConfig(sparsify="topk", k=4, quant_bits=4, chunk=3),
        EncoderConfig(sparsify="topk", k=2),
        EncoderConfig(sparsify="randk", density=0.5, quant_bits=1, compress=True),
    ]
    return [UpdateEncoder(c, np.random.default_rng(1)).encode(delta, META) for c in configs]


VALID = _valid_messages()
SPECS = {"w": TensorSpec((6, 5)), "b": TensorSpec((3,))}


def _decode_only_protocol_errors(body: bytes, expected: dict[str, TensorSpec] | None = None) -> None:
    try:
        msg = decode_message(body, expected=expected)
    except ProtocolError:
        return
    for arr in msg.tensors.values():  # whatever decodes is a well-formed array
        assert isinstance(arr, np.ndarray)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_only_protocol_errors(data)
    _decode_only_protocol_errors(b"FFLT\x01\x00" + data)


@FUZZ
@given(
    index=st.integers(0, len(VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10_000),
    reseal=st.booleans(),
)
def test_fuzz_mutated_messages(index: int, edits: list[tuple[int, int]], cut: int, reseal: bool) -> None:
    """Byte edits and truncation; with ``reseal`` the CRC is recomputed so the edits reach
    the header and payload checks instead of stopping at the checksum."""
    body = bytearray(VALID[index])
    for pos, value in edits:
        body[pos % len(body)] = value
    body = body[: max(4, len(body) - cut % 40)]
    if reseal:
        body[-4:] = struct.pack("<I", zlib.crc32(bytes(body[:-4])))
    _decode_only_protocol_errors(bytes(body))
    _decode_only_protocol_errors(bytes(body), SPECS)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
ENTRY_KEYS = ["name", "dtype", "shape", "encoding", "nbytes", "bits", "chunk", "nnz", "index", "extra"]


@FUZZ
@given(
    index=st.integers(0, len(VALID) - 1),
    tensor=st.integers(0, 1),
    key=st.sampled_from(ENTRY_KEYS),
    value=JSON_VALUES
    | st.integers(-3, 300)
    | st.sampled_from(["bitmap", "varint", "quant", "sparse", "float64"]),
    drop=st.booleans(),
    payload_edit=st.none() | st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
)
def test_fuzz_header_fields(
    index: int, tensor: int, key: str, value: Any, drop: bool, payload_edit: tuple[int, int] | None
) -> None:
    """Structured mutations of one header field (and maybe one payload byte), re-framed
    with a valid CRC: every field check is exercised, and nothing but ProtocolError escapes."""
    header, payload, flags = split(VALID[index])
    entry = header["tensors"][tensor]
    if drop:
        entry.pop(key, None)
    else:
        entry[key] = value
    if payload_edit is not None and payload:
        pos, byte = payload_edit
        payload = payload[: pos % len(payload)] + bytes([byte]) + payload[pos % len(payload) + 1 :]
    body = frame(json.dumps(header).encode(), payload, flags=flags)
    _decode_only_protocol_errors(body, SPECS)
    if key != "shape":  # an unchecked shape could ask for a 1 GiB sparse tensor
        _decode_only_protocol_errors(body)
