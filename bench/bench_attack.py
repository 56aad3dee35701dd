"""Malformed traffic under load (issue 7): honest phones' latency alone, then next to an attacker.

``python -m bench.bench_attack`` starts ``fedfleet serve`` as its own process (its RSS is read from
/proc; the attacker's CPU is not the server's), runs ``--honest`` signing phones in a second process
(check-in, download, think, signed upload) and measures their per-request latency for
``--baseline-s`` alone; then a third process sends ``--requests`` seeded fuzzed requests in every
category of ``CATEGORIES`` at ``--rps`` with ``--concurrency`` connections, and holds ``--loris``
slow-loris connections (headers or bodies trickled a byte at a time) open meanwhile. It reports
the status codes per category (all must be 4xx), the merges (only honest updates may be merged:
checked in the server's SQLite file afterwards), honest p50/p99 before, during and ``--after-s``
after the attack (the same phones, timed the same way, by each request's start), and the server's
RSS before, after and at its peak, and every ``--rss-every-s`` during the attack with the growth of
its first and second half (``--soak-s`` runs the attack for a duration instead of a count, to show
that memory plateaus). Writes bench/results/attack.json (``--out``).

The fuzzer (``Fuzzer``) is shared with tests/test_fuzz_http.py, which runs ~1,000 of its cases
against the in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bench.common import wait_listening
from fedfleet.device_runtime import aio
from fedfleet.protocol import encode_message
from fedfleet.protocol.signing import NONCE_HEADER, SIGNATURE_HEADER, PhoneKey, signed_text
from fedfleet.protocol.wire import FLAG_ZLIB, WireTensor, encode_wire, frame

CATEGORIES = (
    "truncated", "corrupted", "wrong_shape", "bad_indices", "non_finite", "huge_norm", "bad_examples",
    "bad_meta", "oversized", "http_bomb", "wire_bomb", "signature", "bad_auth", "bad_json", "bad_http",
)
ATTACKER_PREFIX = "mallory"


# --- the fuzzer ----------------------------------------------------------------------------------
@dataclass
class Case:
    """One request the attacker sends. ``raw``: bytes written to a fresh socket as they are;
    ``stream_bytes``: a chunked body of that many bytes (no Content-Length)."""

    category: str
    name: str
    method: str = "POST"
    path: str = "/v1/update"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream_bytes: int = 0
    raw: bytes | None = None


@dataclass
class Attacker:
    """A phone the attacker registered with its own Ed25519 key: it can sign anything, with any nonce."""

    phone: str
    token: str
    secret: Ed25519PrivateKey
    last_nonce: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def sign(self, base_version: int, update_id: str, body: bytes, nonce: int | None = None,
             phone: str | None = None) -> dict[str, str]:
        if nonce is None:
            nonce = self.last_nonce = max(int(time.time() * 1e3), self.last_nonce + 1)
        sig = self.secret.sign(signed_text(phone or self.phone, base_version, update_id, body, nonce))
        return {SIGNATURE_HEADER: base64.b64encode(sig).decode(), NONCE_HEADER: str(nonce)}


def public_b64(secret: Ed25519PrivateKey) -> str:
    return base64.b64encode(secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True)
class Capture:
    """An honest phone's accepted, signed upload, as an eavesdropper saw it."""

    headers: dict[str, str]
    body: bytes


def make_bombs(max_update_bytes: int) -> dict[str, bytes]:
    """Compressed bodies that inflate to ~1,000x their size (built once: compressing takes a moment)."""
    zeros = b"\0" * (64 * max_update_bytes)
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    return {
        "gzip": gz.compress(zeros) + gz.flush(),
        "deflate": zlib.compress(zeros, 9),
        "wire_zlib": zlib.compress(zeros, 9),  # a wire payload that inflates far past its declared size
    }


class Fuzzer:
    """Seeded malformed requests, each invalid by construction (never a valid update by luck):
    ``case(category)`` or ``cases(n)`` (round-robin over ``CATEGORIES``)."""

    def __init__(self, task: dict[str, Any], attackers: list[Attacker], rng: np.random.Generator,
                 max_update_bytes: int, bombs: dict[str, bytes], captures: Callable[[], Capture | None]) -> None:
        self.params = [(p["name"], tuple(p["shape"])) for p in task["params"]]
        self.attackers, self.rng = attackers, rng
        self.limit, self.bombs, self.captures = max_update_bytes, bombs, captures
        self.serial = 0
        self.other = Attacker("nobody", "", Ed25519PrivateKey.generate())  # someone else's key, for forgeries

    # helpers
    def _pick(self, seq: Any) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def _delta(self, scale: float = 0.01) -> dict[str, np.ndarray]:
        return {n: (self.rng.standard_normal(s) * scale).astype(np.float32) for n, s in self.params}

    def _meta(self, **changes: Any) -> dict[str, Any]:
        self.serial += 1
        meta: dict[str, Any] = {"update_id": f"fz{self.serial}", "base_version": 0, "num_examples": 10,
                                "train_loss": 1.0, "round": 1}
        meta.update(changes)
        return meta

    def _valid(self) -> tuple[bytes, dict[str, Any]]:
        meta = self._meta()
        return encode_message("update", meta, self._delta()), meta

    def _signed(self, a: Attacker, body: bytes, meta: dict[str, Any] | None = None) -> dict[str, str]:
        """Correct signature headers when ``meta`` is known (so only the defect under test can stop
        the request), otherwise a signature over the bytes with placeholder fields."""
        m = meta or {}
        base, uid = m.get("base_version"), m.get("update_id")
        return {**a.auth, **a.sign(base if type(base) is int else 0, uid if isinstance(uid, str) else "x", body)}

    def _upload(self, category: str, name: str, body: bytes, meta: dict[str, Any] | None = None) -> Case:
        a = self._pick(self.attackers)
        return Case(category, name, headers=self._signed(a, body, meta), body=body)

    def _wire(self, tensors: list[WireTensor]) -> bytes:
        return encode_wire("update", self._meta(), tensors)

    def _dense(self, skip: str | None = None) -> list[WireTensor]:
        out = []
        for n, s in self.params:
            if n != skip:
                arr = (self.rng.standard_normal(s) * 0.01).astype("<f4")
                out.append(WireTensor(n, "float32", s, "dense", {}, arr.tobytes()))
        return out

    def cases(self, n: int) -> list[Case]:
        return [self.case(CATEGORIES[i % len(CATEGORIES)]) for i in range(n)]

    def case(self, category: str) -> Case:
        return getattr(self, f"_{category}")()

    # categories
    def _truncated(self) -> Case:
        body, _ = self._valid()
        cut = body[: int(self.rng.integers(0, len(body) - 4))]
        if self.rng.random() < 0.5:  # as cut on the wire
            return self._upload("truncated", "cut", cut)
        # cut, with a CRC-32 that fits what is left: the length fields have to catch it
        return self._upload("truncated", "cut_crc_fixed", cut + struct.pack("<I", zlib.crc32(cut)))

    def _corrupted(self) -> Case:
        body = bytearray(self._valid()[0])
        for pos in self.rng.integers(0, len(body), size=int(self.rng.integers(1, 9))):
            body[pos] ^= int(self.rng.integers(1, 256))  # CRC-32 catches any change of up to 32 bits
        return self._upload("corrupted", "flip", bytes(body))

    def _wrong_shape(self) -> Case:
        delta = self._delta()
        name, shape = self._pick(self.params)
        kind = self._pick(["missing", "extra", "shape", "dtype", "rename", "empty", "scalar"])
        if kind == "missing":
            del delta[name]
        elif kind == "extra":
            delta[f"evil{self.rng.integers(1000)}"] = np.zeros(int(self.rng.integers(1, 100)), np.float32)
        elif kind == "shape":
            dims = list(shape)
            dims[int(self.rng.integers(len(dims)))] += int(self.rng.choice([-1, 1, 7]))
            delta[name] = np.zeros(dims, np.float32)
        elif kind == "dtype":
            delta[name] = delta[name].astype(self._pick(["float64", "float16", "int32", "int64"]))
        elif kind == "rename":
            delta[name + "_"] = delta.pop(name)
        elif kind == "empty":
            delta = {}
        else:
            delta[name] = np.zeros((), np.float32)
        meta = self._meta()
        return self._upload("wrong_shape", kind, encode_message("update", meta, delta), meta)

    def _bad_indices(self) -> Case:
        """One tensor sparse-coded with a defect, the others dense."""
        name, shape = self._pick(self.params)
        size = int(np.prod(shape))
        nnz = int(self.rng.integers(2, min(size, 64)))
        idx = np.sort(self.rng.choice(size, nnz, replace=False))
        values = (self.rng.standard_normal(nnz) * 0.01).astype("<f4").tobytes()
        kind = self._pick(["out_of_range", "duplicate", "long_varint", "not_shortest", "count",
                           "bitmap_count", "bitmap_padding", "bitmap_length", "nnz_too_big", "nnz_negative",
                           "coding"])
        coding, fields_nnz = "varint", nnz
        deltas = np.diff(idx, prepend=0)
        varints = [_varint(int(d)) for d in deltas]
        if kind == "out_of_range":
            varints[-1] = _varint(int(deltas[-1]) + size)
        elif kind == "duplicate":
            varints[1] = _varint(0)
        elif kind == "long_varint":
            varints[0] = b"\x80\x80\x80\x80\x01"
        elif kind == "not_shortest":
            varints[0] = bytes([0x80 | (int(deltas[0]) & 0x7F), 0x00]) if deltas[0] < 128 else varints[0] + b"\x00"
        elif kind == "count":
            varints = varints[:-1]
        index = b"".join(varints)
        if kind.startswith("bitmap"):
            coding = "bitmap"
            mask = np.zeros(size + (-size) % 8, np.uint8)
            mask[idx] = 1
            if kind == "bitmap_count":
                mask[int(self.rng.integers(size))] ^= 1
                fields_nnz = nnz if mask[:size].sum() != nnz else nnz + 1
            elif kind == "bitmap_padding":
                if size % 8 == 0:  # no padding bits to set: make the count wrong instead
                    fields_nnz = nnz - 1
                else:
                    mask[-1] = 1
            index = np.packbits(mask, bitorder="little").tobytes()
            if kind == "bitmap_length":
                index += b"\0"
        elif kind == "nnz_too_big":
            fields_nnz = size + 1
        elif kind == "nnz_negative":
            fields_nnz = -1
        elif kind == "coding":
            coding = "rle"
        sparse = WireTensor(name, "float32", shape, "sparse", {"nnz": fields_nnz, "index": coding, "bits": 32},
                            index + values)
        tensors = [sparse if t.name == name else t for t in self._dense()]
        return self._upload("bad_indices", kind, self._wire(tensors))

    def _non_finite(self) -> Case:
        delta = self._delta()
        name, _ = self._pick(self.params)
        flat = delta[name].reshape(-1)
        kind = self._pick(["nan", "inf", "-inf", "all_nan", "sparse_nan"])
        if kind == "sparse_nan":
            values = np.array([np.nan, 0.5], "<f4").tobytes()
            sparse = WireTensor(name, "float32", tuple(delta[name].shape), "sparse",
                                {"nnz": 2, "index": "varint", "bits": 32}, b"\x00\x01" + values)
            return self._upload("non_finite", kind, self._wire(
                [sparse if t.name == name else t for t in self._dense()]))
        if kind == "all_nan":
            flat[:] = np.nan
        else:
            flat[int(self.rng.integers(flat.size))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
        meta = self._meta()
        return self._upload("non_finite", kind, encode_message("update", meta, delta), meta)

    def _huge_norm(self) -> Case:
        """Finite float32 values (up to 3e38) that a merge would overflow; signed correctly, so
        only the server's norm bound stands between them and the model."""
        delta = self._delta()
        name, _ = self._pick(self.params)
        magnitude = np.float32(10 ** self.rng.uniform(6.5, 38.5))
        delta[name] = np.where(self.rng.random(delta[name].shape) < 0.5, -magnitude, magnitude).astype(np.float32)
        meta = self._meta()
        return self._upload("huge_norm", "scale", encode_message("update", meta, delta), meta)

    def _bad_examples(self) -> Case:
        value = self._pick([0, -1, -(10**9), 10**12, 10**15, 1.5, "10", None, True, [10], {"n": 10}])
        meta = self._meta(num_examples=value)
        return self._upload("bad_examples", repr(value)[:16], encode_message("update", meta, self._delta()), meta)

    def _bad_meta(self) -> Case:
        kind = self._pick(["no_update_id", "empty_update_id", "long_update_id", "int_update_id",
                           "negative_base", "string_base", "future_base", "loss_string", "missing_all",
                           "model_kind"])
        variants: dict[str, dict[str, Any]] = {
            "no_update_id": {}, "empty_update_id": {"update_id": ""}, "long_update_id": {"update_id": "u" * 200},
            "int_update_id": {"update_id": 7}, "negative_base": {"base_version": -1},
            "string_base": {"base_version": "0"}, "future_base": {"base_version": 10**9},
            "loss_string": {"train_loss": "low"}, "missing_all": {}, "model_kind": {},
        }
        meta = self._meta(**variants[kind])
        if kind == "no_update_id":
            del meta["update_id"]
        if kind == "missing_all":
            meta = {}
        body = encode_message("model" if kind == "model_kind" else "update", meta, self._delta())
        return self._upload("bad_meta", kind, body, meta)

    def _oversized(self) -> Case:
        a = self._pick(self.attackers)
        kind = self._pick(["declared", "streamed", "json_streamed", "declared_checkin"])
        if kind == "declared":  # Content-Length far over the limit; a few bytes sent
            size = int(self.rng.integers(self.limit + 1, 10**12))
            return Case("oversized", kind, raw=_raw_request("POST", "/v1/update", {**a.auth, "Content-Length": str(size)},
                                                             b"FFLT"))
        if kind == "declared_checkin":
            return Case("oversized", kind, raw=_raw_request("POST", "/v1/checkin", {**a.auth, "Content-Length": str(10**9)},
                                                             b"{"))
        if kind == "json_streamed":
            return Case("oversized", kind, path="/v1/register", stream_bytes=int(self.rng.integers(17 << 10, 1 << 20)))
        # signed (over nothing, with a fresh nonce) so that the headers pass and the stream has to be cut
        return Case("oversized", kind, headers=self._signed(a, b""),
                    stream_bytes=int(self.limit * self.rng.uniform(1.01, 64)))

    def _http_bomb(self) -> Case:
        a = self._pick(self.attackers)
        kind = self._pick(["gzip", "deflate", "gzip_register", "br", "garbage_gzip"])
        if kind == "gzip_register":
            return Case("http_bomb", kind, path="/v1/register", headers={"Content-Encoding": "gzip"},
                        body=self.bombs["gzip"])
        if kind == "garbage_gzip":
            return Case("http_bomb", kind, headers={**a.auth, "Content-Encoding": "gzip"},
                        body=b"\x1f\x8b\x08\xff" + self.rng.bytes(64))
        body = self.bombs.get(kind, self.bombs["deflate"])
        return Case("http_bomb", kind, headers={**a.auth, "Content-Encoding": kind}, body=body)

    def _wire_bomb(self) -> Case:
        """The wire format's own zlib flag: payloads and headers that inflate far past what the
        header declares, or declare more than the model has."""
        kind = self._pick(["payload_bomb", "big_shape", "bad_stream", "trailing", "header_bomb"])
        dense = self._dense()
        if kind == "big_shape":  # declares 2**28 floats, then a 64 KiB bomb: refused before inflating
            name, _ = self._pick(self.params)
            dense = [WireTensor(t.name, "float32", (1 << 14, 1 << 14), "dense", {}, b"") if t.name == name else t
                     for t in dense]
            header = json.dumps({"kind": "update", "meta": self._meta(), "tensors": [
                {"name": t.name, "dtype": "float32", "shape": list(t.shape), "encoding": "dense",
                 "nbytes": 4 * int(np.prod(t.shape))} for t in dense]}, separators=(",", ":")).encode()
            return self._upload("wire_bomb", kind, frame(header, self.bombs["wire_zlib"], flags=FLAG_ZLIB))
        if kind == "header_bomb":  # flag bit 1 (compressed header) with a header that inflates to 64 MiB
            header = self.bombs["wire_zlib"]
            return self._upload("wire_bomb", kind, frame(header, b"", flags=3))
        body = self._wire(dense)
        (hlen,) = struct.unpack_from("<I", body, 8)
        header = body[12:12 + hlen]
        plain = body[12 + hlen + 4:-4]
        payload = {"payload_bomb": self.bombs["wire_zlib"], "bad_stream": b"\x78\x9c" + self.rng.bytes(200),
                   "trailing": zlib.compress(plain) + b"junk"}[kind]
        return self._upload("wire_bomb", kind, frame(header, payload, flags=FLAG_ZLIB))

    def _signature(self) -> Case:
        a = self._pick(self.attackers)
        kind = self._pick(["forged", "tampered", "other_phone", "garbage", "not_base64", "bad_nonce", "stale",
                           "future", "unsigned", "replay"])
        if kind == "replay":
            cap = self.captures()
            if cap is not None:
                return Case("signature", "replay", headers=dict(cap.headers), body=cap.body)
            kind = "forged"
        body, meta = self._valid()  # a valid update: only its signature is wrong
        uid = meta["update_id"]
        nonce = int(time.time() * 1e3)
        if kind == "forged":
            sig = self.other.sign(0, uid, body, phone=a.phone)
        elif kind == "tampered":
            sig = a.sign(0, uid, body + b"x")
        elif kind == "other_phone":
            sig = a.sign(0, uid, body, phone=ATTACKER_PREFIX + "-elsewhere")
        elif kind == "garbage":
            sig = {SIGNATURE_HEADER: base64.b64encode(self.rng.bytes(64)).decode(), NONCE_HEADER: str(nonce)}
        elif kind == "not_base64":
            sig = {SIGNATURE_HEADER: "%%%not base64%%%", NONCE_HEADER: str(nonce)}
        elif kind == "bad_nonce":
            sig = {SIGNATURE_HEADER: base64.b64encode(self.rng.bytes(64)).decode(), NONCE_HEADER: "soon"}
        elif kind in ("stale", "future"):  # correctly signed, with a nonce outside the skew window
            sig = a.sign(0, uid, body, nonce + (-1 if kind == "stale" else 1) * int(self.rng.integers(400_000, 10**10)))
        else:
            sig = {}
        return Case("signature", kind, headers={**a.auth, **sig}, body=body)

    def _bad_auth(self) -> Case:
        body, meta = self._valid()
        kind = self._pick(["unknown_token", "no_header", "basic", "empty_bearer", "long_token"])
        token = {"unknown_token": "Bearer " + base64.urlsafe_b64encode(self.rng.bytes(24)).decode(),
                 "basic": "Basic " + base64.b64encode(b"mallory:pw").decode(), "empty_bearer": "Bearer ",
                 "long_token": "Bearer " + "A" * 4000}.get(kind)
        headers = {"Authorization": token} if token is not None else {}
        path = self._pick(["/v1/update", "/v1/checkin", "/v1/model"])
        if path == "/v1/model":
            return Case("bad_auth", kind, method="GET", path=path, headers=headers)
        return Case("bad_auth", kind, path=path, headers=headers, body=body if path == "/v1/update" else b"{}")

    def _bad_json(self) -> Case:
        a = self._pick(self.attackers)
        kind = self._pick(["not_json", "array", "bad_name", "name_type", "bad_key", "short_key", "checkin_junk",
                           "deep", "bad_query", "huge_version", "bad_since", "admin"])
        bodies = {"not_json": b"{not json", "array": b"[1,2,3]", "bad_name": b'{"name":"bad name!"}',
                  "name_type": b'{"name":12345}', "bad_key": b'{"name":"x1","public_key":"%%%"}',
                  "short_key": b'{"public_key":"AAAA"}', "deep": b"[" * 5000 + b"]" * 5000}
        if kind in bodies:
            return Case("bad_json", kind, path="/v1/register", body=bodies[kind],
                        headers={"Content-Type": "application/json"})
        if kind == "checkin_junk":
            return Case("bad_json", kind, path="/v1/checkin", headers=a.auth, body=self.rng.bytes(32))
        if kind == "bad_query":
            return Case("bad_json", kind, method="GET", path="/v1/model?version=abc", headers=a.auth)
        if kind == "huge_version":
            return Case("bad_json", kind, method="GET", path=f"/v1/model?version={10**30}", headers=a.auth)
        if kind == "bad_since":
            return Case("bad_json", kind, method="GET", path="/v1/rounds?since=1e999")
        return Case("bad_json", kind, path="/v1/admin/pause", headers=a.auth)

    def _bad_http(self) -> Case:
        a = self._pick(self.attackers)
        kind = self._pick(["negative_length", "two_lengths", "bad_length", "bad_chunk", "length_and_chunked",
                           "long_header", "many_headers", "bad_method", "null_in_path", "no_host_junk",
                           "unknown_path", "wrong_method"])
        auth = a.auth
        req = {
            "negative_length": _raw_request("POST", "/v1/update", {**auth, "Content-Length": "-1"}, b""),
            "two_lengths": _raw_request("POST", "/v1/update", {**auth, "Content-Length": "3"}, b"abc",
                                        extra=b"Content-Length: 5\r\n"),
            "bad_length": _raw_request("POST", "/v1/update", {**auth, "Content-Length": "1e3"}, b""),
            "bad_chunk": _raw_request("POST", "/v1/update", {**auth, "Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n"),
            "length_and_chunked": _raw_request("POST", "/v1/update", {**auth, "Content-Length": "4",
                                                                       "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"),
            "long_header": _raw_request("POST", "/v1/checkin", {**auth, "X-Pad": "p" * 9000}, b""),
            "many_headers": _raw_request("POST", "/v1/checkin", {**auth, **{f"X-H{i}": "1" for i in range(200)}}, b""),
            "bad_method": b"P\x00ST /v1/update HTTP/1.1\r\nHost: x\r\n\r\n",
            "null_in_path": b"GET /v1/\x00model HTTP/1.1\r\nHost: x\r\n\r\n",
            "no_host_junk": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + self.rng.bytes(40) + b"\r\n\r\n",
            "unknown_path": _raw_request("GET", "/v1/../../etc/passwd", {}, b""),
            "wrong_method": _raw_request("DELETE", "/v1/model", auth, b""),
        }[kind]
        return Case("bad_http", kind, raw=req)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _raw_request(method: str, path: str, headers: dict[str, str], body: bytes, extra: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + extra + b"\r\n" + body


# --- sending ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: int  # 0: no HTTP answer (the connection broke)
    error: str = ""  # the JSON 'error' tag, the first words of a text answer, or the client's exception
    message: bool = False  # the answer carried a human-readable message


async def send(session: aiohttp.ClientSession, host: str, port: int, case: Case, timeout_s: float = 60.0) -> Outcome:
    if case.raw is not None:
        return await _send_raw(host, port, case, timeout_s)
    url = f"http://{host}:{port}{case.path}"
    data: Any = case.body
    if case.stream_bytes:
        data = _zeros(case.stream_bytes)
    try:
        async with session.request(case.method, url, data=data if case.method != "GET" else None,
                                   headers=case.headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            text = await r.text(errors="replace")
            return Outcome(case, r.status, *_describe(text))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Outcome(case, 0, type(exc).__name__)


async def _zeros(total: int) -> AsyncIterator[bytes]:
    chunk = b"\0" * (64 << 10)
    sent = 0
    while sent < total:
        part = chunk[: min(len(chunk), total - sent)]
        sent += len(part)
        yield part


async def _send_raw(host: str, port: int, case: Case, timeout_s: float) -> Outcome:
    assert case.raw is not None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(case.raw)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                text = (await reader.readexactly(length)).decode(errors="replace") if length else ""
                return Outcome(case, status, *_describe(text))
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        return Outcome(case, 0, type(exc).__name__)


def _describe(text: str) -> tuple[str, bool]:
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return str(data.get("error", "")), bool(data.get("message"))
    except ValueError:
        pass
    return text.split("\n", 1)[0][:60], bool(text.strip())


async def slow_loris(host: str, port: int, kind: str, attacker: Attacker, stop: asyncio.Event,
                     gap_s: float = 1.0) -> list[dict[str, Any]]:
    """Hold one slow connection after another until ``stop``: ``headers`` trickles an upload's header
    block one byte per ``gap_s`` and never ends it; ``body`` sends whole headers (signed with a fresh
    nonce, so that they pass), then the body one byte per ``gap_s``; ``idle`` connects and sends
    nothing. Each episode: how it ended, how long."""
    episodes = []
    while not stop.is_set():
        signed = "".join(f"{k}: {v}\r\n" for k, v in attacker.sign(0, "x", b"").items())
        head = (f"POST /v1/update HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {attacker.token}\r\n{signed}"
                "Content-Length: 4096\r\n")
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port)
        if kind == "body":
            writer.write(head.encode() + b"\r\n")
        data = {"headers": head.encode() + b"X-Pad: " + b"p" * 4000, "body": b"\0" * 4096, "idle": b""}[kind]
        status, end, i = 0, "held until the attack ended", 0
        try:
            while not stop.is_set():
                if i < len(data):
                    writer.write(data[i:i + 1])
                    i += 1
                    await writer.drain()
                try:
                    got = await asyncio.wait_for(reader.read(200), gap_s)
                except TimeoutError:
                    continue
                status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/") else 0
                end = "answered" if status else "closed by the server"
                break
        except OSError:
            end = "closed by the server"
        finally:
            writer.close()
        episodes.append({"kind": kind, "status": status, "end": end, "held_s": round(time.monotonic() - t0, 2)})
    return episodes


# --- the three processes ---------------------------------------------------------------------------
def _register(url: str, name: str, public_key: str) -> tuple[str, dict[str, Any]]:
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/register", data=json.dumps({"name": name, "public_key": public_key}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.loads(r.read())
    return body["token"], body["task"]


def honest_main(url: str, phones: int, seed: int, stop: Any, think_s: float, captures: Any, out: Any) -> None:
    """Honest phones: check in, download (If-None-Match), think, signed upload; every request timed.
    ``stop``: a multiprocessing Event."""
    captures.cancel_join_thread()  # captures nobody reads any more must not keep this process alive
    records: list[tuple[float, str, float, int]] = []  # (start, kind, seconds, status)
    accepted: list[tuple[str, str]] = []

    async def phone(i: int, http: aiohttp.ClientSession) -> None:
        key = PhoneKey()
        name = f"honest-{i}"
        token, task = await asyncio.to_thread(_register, url, name, key.public_b64())
        auth = {"Authorization": f"Bearer {token}"}
        specs = [(p["name"], tuple(p["shape"])) for p in task["params"]]
        prng = np.random.default_rng([seed, 2, i])
        etag, version, n = "", 0, 0

        async def timed(kind: str, method: str, path: str, **kw: Any) -> tuple[int, bytes, Any]:
            t = time.time()
            try:
                async with http.request(method, url + path, **kw) as r:
                    data = await r.read()
                    status, headers = r.status, r.headers
            except (aiohttp.ClientError, OSError, TimeoutError):
                status, data, headers = 0, b"", None
            records.append((t, kind, time.time() - t, status))
            return status, data, headers or {}

        while not stop.is_set():
            status, data, _ = await timed("checkin", "POST", "/v1/checkin", headers=auth, json={})
            answer = json.loads(data) if status == 200 else {}
            if answer.get("action") != "train":
                await asyncio.sleep(float(answer.get("retry_after_s", 1.0)) if status == 200 else 1.0)
                continue
            status, _, headers = await timed("model", "GET", "/v1/model", headers={**auth, "If-None-Match": etag})
            if status in (200, 304):
                etag = headers.get("ETag", etag)
                version = int(headers.get("X-Fedfleet-Version", version))
            await asyncio.sleep(float(prng.exponential(think_s)))
            n += 1
            uid = f"{name}-u{n}"
            delta = {s: (prng.standard_normal(shape) * 1e-3).astype(np.float32) for s, shape in specs}
            body = encode_message("update", {"update_id": uid, "base_version": version, "num_examples": 10,
                                             "train_loss": 1.0, "round": 0}, delta)
            for _attempt in range(20):
                signed = {**auth, **key.headers(name, version, uid, body)}
                status, data, headers = await timed("upload", "POST", "/v1/update", data=body, headers=signed)
                if status != 503:
                    break
                await asyncio.sleep(float(headers.get("Retry-After", 1)))
            if status == 200 and not json.loads(data).get("duplicate"):
                accepted.append((name, uid))
                try:
                    captures.put_nowait(({**signed}, body))
                except queue.Full:
                    pass

    async def main() -> None:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as http:
            await asyncio.gather(*(phone(i, http) for i in range(phones)))

    aio.run(main())
    out.put({"records": records, "accepted": accepted})


def attacker_main(url: str, seed: int, requests: int, rps: float, concurrency: int, loris: int,
                  max_update_bytes: int, nice: int, captures: Any, out: Any) -> None:
    os.nice(nice)  # the attacker's own CPU work (encoding, signing) yields to the server and honest phones
    host, port = url.removeprefix("http://").split(":")
    rng = np.random.default_rng([seed, 3])
    bombs = make_bombs(max_update_bytes)
    attackers = []
    task: dict[str, Any] = {}
    for i in range(4):  # setup (not fuzz): the attacker's own enrolled phones
        secret = Ed25519PrivateKey.generate()
        token, task = _register(url, f"{ATTACKER_PREFIX}-{i}", public_b64(secret))
        attackers.append(Attacker(f"{ATTACKER_PREFIX}-{i}", token, secret))
    caps: list[Capture] = []

    def capture() -> Capture | None:
        try:
            while True:
                h, b = captures.get_nowait()
                caps.append(Capture(h, b))
                del caps[:-64]
        except queue.Empty:
            pass
        return caps[int(rng.integers(len(caps)))] if caps else None

    fuzzer = Fuzzer(task, attackers, rng, max_update_bytes, bombs, capture)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]], float, float]:
        sem = asyncio.Semaphore(concurrency)
        rows: list[dict[str, Any]] = []
        conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        kinds = ["headers", "body", "idle"]
        stop = asyncio.Event()
        lorises = [asyncio.create_task(slow_loris(host, int(port), kinds[i % 3], attackers[i % 4], stop))
                   for i in range(loris)]
        t0 = time.time()
        async with aiohttp.ClientSession(connector=conn) as http:
            async def one(case: Case) -> None:
                try:
                    o = await send(http, host, int(port), case)
                finally:
                    sem.release()
                rows.append({"category": case.category, "name": case.name, "status": o.status, "error": o.error,
                             "message": o.message})

            tasks = []
            for i in range(requests):
                await sem.acquire()
                case = fuzzer.case(CATEGORIES[i % len(CATEGORIES)])
                delay = t0 + i / rps - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(case)))
            await asyncio.gather(*tasks)
        t1 = time.time()
        stop.set()
        loris_rows = [e for episodes in await asyncio.gather(*lorises) for e in episodes]
        return rows, loris_rows, t0, t1

    rows, loris_rows, t0, t1 = aio.run(main())
    out.put({"rows": rows, "loris": loris_rows, "t0": t0, "t1": t1})


# --- the server process ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, settings: dict[str, Any], port: int) -> subprocess.Popen[bytes]:
    cfg = data_dir / "server.toml"
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    cfg.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--data-dir",
                             str(data_dir), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(data_dir / "server.log", "wb"), env=env)
    wait_listening(proc, port, data_dir / "server.log")
    return proc


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now and at its peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            fields[k] = int(v.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = mp.get_context("spawn")
    data_dir = Path(tempfile.mkdtemp(prefix="ff-attack-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"model": "mlp", "dataset": "digits", "mode": "async", "rounds": 0, "concurrency": args.honest + 8,
                "buffer_size": 10, "max_staleness": 50, "round_timeout_s": 60.0, "require_signatures": True,
                "max_update_bytes": args.max_update_bytes, "request_timeout_s": args.request_timeout_s,
                "seed": args.seed}
    server = start_server(data_dir, settings, port)
    samples: list[tuple[float, int, float]] = []  # (time, server RSS KiB, 1-minute load average)
    try:
        captures, h_out, a_out = ctx.Queue(maxsize=256), ctx.Queue(), ctx.Queue()
        t_start = time.time()
        stop = ctx.Event()
        honest = ctx.Process(target=honest_main, args=(url, args.honest, args.seed, stop, args.think_s,
                                                       captures, h_out))
        honest.start()
        attack_at = t_start + args.warmup_s + args.baseline_s
        while time.time() < attack_at - args.baseline_s:
            time.sleep(0.05)
        cpu_base = (cpu_s(server.pid), cpu_s(honest.pid or 0), time.time())
        rss_baseline_start = rss_kib(server.pid)[0]
        while time.time() < attack_at:
            samples.append((time.time(), rss_kib(server.pid)[0], load1()))
            time.sleep(0.25)
        rss_before = rss_kib(server.pid)[0]
        attacker = ctx.Process(target=attacker_main, args=(url, args.seed, args.requests, args.rps, args.concurrency,
                                                           args.loris, args.max_update_bytes, args.attacker_nice,
                                                           captures, a_out))
        attacker.start()
        cpu_attack0 = (cpu_s(server.pid), cpu_s(honest.pid or 0), cpu_s(attacker.pid or 0), time.time())
        attacker_cpu = 0.0
        attack: dict[str, Any] | None = None
        while attack is None:
            samples.append((time.time(), rss_kib(server.pid)[0], load1()))
            attacker_cpu = cpu_s(attacker.pid or 0) or attacker_cpu
            try:
                attack = a_out.get(timeout=0.25)
            except queue.Empty:
                if not attacker.is_alive() and a_out.empty():
                    raise RuntimeError("the attacker process died") from None
        cpu_attack1 = (cpu_s(server.pid), cpu_s(honest.pid or 0), attacker_cpu, time.time())
        attacker.join()
        rss_after = rss_kib(server.pid)[0]
        quiet_until = time.time() + max(args.tail_s, args.after_s + 1.0)
        while time.time() < quiet_until:  # honest phones alone again: the "after" baseline
            samples.append((time.time(), rss_kib(server.pid)[0], load1()))
            time.sleep(0.25)
        stop.set()
        honest_res = h_out.get(timeout=600)
        honest.join()
        time.sleep(1.0)
        rss_settled, rss_hwm = rss_kib(server.pid)
        async def final() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/v1/status") as r:
                    st = await r.json()
                async with http.get(f"{url}/v1/rounds") as r:
                    rounds = (await r.json())["rounds"]
            return st, rounds
        status, rounds = aio.run(final())
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    db = sqlite3.connect(str(data_dir / "server.sqlite"))
    merged_rows = db.execute("SELECT COUNT(*) FROM merged").fetchone()[0]
    pending_rows = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    attacker_rows = db.execute("SELECT COUNT(*) FROM (SELECT phone FROM merged UNION ALL SELECT phone FROM pending) "
                               "WHERE phone LIKE ?", (ATTACKER_PREFIX + "%",)).fetchone()[0]
    db.close()
    result = summarize(args, attack, honest_res, samples, rss_before, rss_after, rss_settled, rss_hwm, status, rounds,
                       merged_rows, pending_rows, attacker_rows, attack_at)
    result["server_rss_mib"]["baseline_start"] = round(rss_baseline_start / 1024, 1)
    base_s = cpu_attack0[-1] - cpu_base[-1]
    att_s = cpu_attack1[-1] - cpu_attack0[-1]
    result["cpu_percent_of_one_core"] = {
        "baseline": {"server": round(100 * (cpu_attack0[0] - cpu_base[0]) / base_s, 1),
                     "honest": round(100 * (cpu_attack0[1] - cpu_base[1]) / base_s, 1)},
        "attack": {"server": round(100 * (cpu_attack1[0] - cpu_attack0[0]) / att_s, 1),
                   "honest": round(100 * (cpu_attack1[1] - cpu_attack0[1]) / att_s, 1),
                   "attacker": round(100 * (cpu_attack1[2] - cpu_attack0[2]) / att_s, 1)},
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    return result


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(args: argparse.Namespace, attack: dict[str, Any], honest: dict[str, Any], samples: list[tuple[float, int, float]],
              rss_before: int, rss_after: int, rss_settled: int, rss_hwm: int, status: dict[str, Any],
              rounds: list[dict[str, Any]], merged_rows: int, pending_rows: int, attacker_rows: int,
              attack_at: float) -> dict[str, Any]:
    rows = attack["rows"]
    t0, t1 = attack["t0"], attack["t1"]
    per_cat: dict[str, Counter[int]] = {c: Counter() for c in CATEGORIES}
    for r in rows:
        per_cat[r["category"]][r["status"]] += 1
    status_hist = Counter(r["status"] for r in rows)
    bad = [r for r in rows if not 400 <= r["status"] < 500]
    no_message = sum(1 for r in rows if 400 <= r["status"] < 500 and not r["message"])
    base_lo = attack_at - args.baseline_s
    recs = honest["records"]
    base = [s for (t, _k, s, _st) in recs if base_lo <= t < attack_at]
    under = [s for (t, _k, s, _st) in recs if t0 <= t <= t1]
    after = [s for (t, _k, s, _st) in recs if t1 + 1.0 <= t < t1 + 1.0 + args.after_s]  # measured as the baseline
    by_kind = {}
    for kind in ("checkin", "model", "upload"):
        b = [s for (t, k, s, _st) in recs if k == kind and base_lo <= t < attack_at]
        u = [s for (t, k, s, _st) in recs if k == kind and t0 <= t <= t1]
        by_kind[kind] = {"baseline_p50_ms": _ms(pct(b, 50)), "baseline_p99_ms": _ms(pct(b, 99)),
                         "attack_p50_ms": _ms(pct(u, 50)), "attack_p99_ms": _ms(pct(u, 99)), "n_baseline": len(b),
                         "n_attack": len(u)}
    honest_status = Counter(st for (_t, _k, _s, st) in recs)
    honest_503 = sum(1 for (t, k, _s, st) in recs if k == "upload" and st == 503)
    merged_updates = sum(r["updates"] for r in rounds)
    buffered = int(status.get("buffered", 0))
    peak_attack = max((kib for (t, kib, _l) in samples if t >= t0), default=rss_after)
    b99, a99, f99 = pct(base, 99), pct(under, 99), pct(after, 99)
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "attack": {
            "requests": len(rows), "seconds": round(t1 - t0, 2), "achieved_rps": round(len(rows) / (t1 - t0), 1),
            "per_category": {c: {str(k): v for k, v in sorted(per_cat[c].items())} for c in CATEGORIES},
            "status_histogram": {str(k): v for k, v in sorted(status_hist.items())},
            "non_4xx": len(bad), "five_xx": sum(1 for r in rows if r["status"] >= 500),
            "no_answer": sum(1 for r in rows if r["status"] == 0), "non_4xx_examples": bad[:20],
            "4xx_without_message": no_message,
            "errors": dict(Counter(f"{r['category']}:{r['error']}" for r in rows).most_common(80)),
            "slow_loris": loris_summary(attack["loris"]),
            "slow_loris_first_episodes": attack["loris"][:12],
        },
        "merges": {
            "honest_accepted": len(honest["accepted"]), "server_merged_updates": merged_updates,
            "server_buffered": buffered, "store_merged_rows": merged_rows, "store_pending_rows": pending_rows,
            "store_rows_of_attacker_phones": attacker_rows, "versions": status.get("version"),
            "rejections": status.get("rejections"),
        },
        "honest": {
            "phones": args.honest, "requests": len(recs), "status": {str(k): v for k, v in sorted(honest_status.items())},
            "upload_503": honest_503,
            "baseline_p50_ms": _ms(pct(base, 50)), "baseline_p99_ms": _ms(b99),
            "attack_p50_ms": _ms(pct(under, 50)), "attack_p99_ms": _ms(a99),
            "p99_ratio": round(a99 / b99, 2) if a99 and b99 else None, "n_baseline": len(base), "n_attack": len(under),
            "after_p50_ms": _ms(pct(after, 50)), "after_p99_ms": _ms(f99), "n_after": len(after),
            "p99_ratio_to_after": round(a99 / f99, 2) if a99 and f99 else None,
            "by_kind": by_kind,
        },
        "server_rss_mib": {"before": round(rss_before / 1024, 1), "after": round(rss_after / 1024, 1),
                           "settled": round(rss_settled / 1024, 1), "peak_during_attack": round(peak_attack / 1024, 1),
                           "high_water_mark": round(rss_hwm / 1024, 1)},
        "server_rss_curve": rss_curve(samples, t0, t1, args.rss_every_s),
        "honest_windows": latency_windows(recs, samples, t0, t1, args.window_s),
    }
    return result


def loris_summary(episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slow-loris episodes grouped by kind and how they ended (a 429 ends one at once, a timeout later)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for e in episodes:
        groups.setdefault((e["kind"], str(e["status"] or e["end"])), []).append(e["held_s"])
    return [{"kind": k, "outcome": o, "episodes": len(v), "min_held_s": min(v), "max_held_s": max(v)}
            for (k, o), v in sorted(groups.items())]


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def latency_windows(recs: list[tuple[float, str, float, int]], samples: list[tuple[float, int, float]], t0: float,
                    t1: float, window_s: float) -> list[dict[str, Any]]:
    """Honest p50/p99 in consecutive windows of the attack, next to the machine's load average then
    (the machine is shared: a window whose p99 rises with the load is other work, not the attack)."""
    rows = []
    start = t0
    while start < t1:
        end = min(t1, start + window_s)
        lat = [s for (t, _k, s, _st) in recs if start <= t < end]
        loads = [ld for (t, _kib, ld) in samples if start <= t < end]
        rows.append({"from_s": round(start - t0), "n": len(lat), "p50_ms": _ms(pct(lat, 50)), "p99_ms": _ms(pct(lat, 99)),
                     "load1": round(sum(loads) / len(loads), 2) if loads else None})
        start = end
    return rows


def rss_curve(samples: list[tuple[float, int, float]], t0: float, t1: float, every_s: float) -> dict[str, Any]:
    """The server's RSS during the attack every ``every_s`` seconds, and its growth in the first and
    the second half of the attack: bounded memory shows as a second half that grows (almost) nothing."""
    during = [(t - t0, kib / 1024) for t, kib, _l in samples if t0 <= t <= t1]
    if len(during) < 2:
        return {}
    curve, next_t = [], 0.0
    for t, mib in during:
        if t >= next_t:
            curve.append([round(t, 1), round(mib, 1)])
            next_t = t + every_s
    mid = (t1 - t0) / 2
    at_mid = min(during, key=lambda p: abs(p[0] - mid))[1]
    first, last = during[0][1], during[-1][1]
    return {"every_s": every_s, "t_s_and_mib": curve, "start_mib": round(first, 1), "mid_mib": round(at_mid, 1),
            "end_mib": round(last, 1), "max_mib": round(max(m for _, m in during), 1),
            "growth_first_half_mib": round(at_mid - first, 1), "growth_second_half_mib": round(last - at_mid, 1)}


def _ms(v: float | None) -> float | None:
    return round(v * 1e3, 2) if v is not None else None


def report(result: dict[str, Any]) -> str:
    from bench.common import table

    a, m, h, rss = result["attack"], result["merges"], result["honest"], result["server_rss_mib"]
    cat_rows = [{"category": c, "sent": sum(v.values()), **{"statuses": " ".join(f"{k}:{n}" for k, n in v.items())}}
                for c, v in a["per_category"].items()]
    lines = [table(cat_rows, ["category", "sent", "statuses"]), ""]
    lines.append(f"attack: {a['requests']} requests in {a['seconds']} s ({a['achieved_rps']}/s); statuses "
                 f"{a['status_histogram']}; non-4xx {a['non_4xx']}, 5xx {a['five_xx']}, no answer {a['no_answer']}, "
                 f"4xx without a message {a['4xx_without_message']}")
    lines.append("slow-loris: " + "; ".join(f"{s['kind']} -> {s['outcome']}: {s['episodes']}x, held {s['min_held_s']}-"
                                            f"{s['max_held_s']} s" for s in a["slow_loris"]))
    lines.append(f"merges: honest accepted {m['honest_accepted']}, server merged {m['server_merged_updates']} + "
                 f"buffered {m['server_buffered']}; store rows merged {m['store_merged_rows']} + pending "
                 f"{m['store_pending_rows']}, of attacker phones {m['store_rows_of_attacker_phones']}")
    lines.append("")
    hrows = [{"phase": "baseline", "requests": h["n_baseline"], "p50_ms": h["baseline_p50_ms"], "p99_ms": h["baseline_p99_ms"]},
             {"phase": "under attack", "requests": h["n_attack"], "p50_ms": h["attack_p50_ms"], "p99_ms": h["attack_p99_ms"]},
             {"phase": "after attack", "requests": h["n_after"], "p50_ms": h["after_p50_ms"], "p99_ms": h["after_p99_ms"]}]
    for kind, k in h["by_kind"].items():
        hrows.append({"phase": f"  {kind} base", "requests": k["n_baseline"], "p50_ms": k["baseline_p50_ms"],
                      "p99_ms": k["baseline_p99_ms"]})
        hrows.append({"phase": f"  {kind} attack", "requests": k["n_attack"], "p50_ms": k["attack_p50_ms"],
                      "p99_ms": k["attack_p99_ms"]})
    lines.append(table(hrows, ["phase", "requests", "p50_ms", "p99_ms"]))
    lines.append(f"honest p99 ratio (attack / baseline): {h['p99_ratio']} (attack / after: {h['p99_ratio_to_after']}); honest statuses {h['status']} "
                 f"(upload 503 backpressure: {h['upload_503']})")
    cpu = result.get("cpu_percent_of_one_core", {})
    lines.append(f"CPU % of one core: baseline {cpu.get('baseline')}, under attack {cpu.get('attack')}; "
                 f"load average at the end {cpu.get('loadavg_at_end')} (2 cores, shared with other work)")
    lines.append(f"server RSS MiB: at the start of the baseline {rss.get('baseline_start')}, before {rss['before']}, after {rss['after']}, settled {rss['settled']}, peak during "
                 f"attack {rss['peak_during_attack']}, high-water mark {rss['high_water_mark']}")
    windows = result.get("honest_windows") or []
    if windows:
        lines.append("honest p99 ms per window of the attack (load average): " + " ".join(
            f"{w['p99_ms']:.0f}({w['load1']})" for w in windows if w["p99_ms"] is not None))
    curve = result.get("server_rss_curve") or {}
    if curve:
        lines.append(f"server RSS during the attack: {curve['start_mib']} -> {curve['mid_mib']} (half-way) -> "
                     f"{curve['end_mib']} MiB; growth first half {curve['growth_first_half_mib']} MiB, second half "
                     f"{curve['growth_second_half_mib']} MiB; every {curve['every_s']} s: "
                     + " ".join(f"{m:.0f}" for _, m in curve["t_s_and_mib"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--rps", type=float, default=200.0, help="attacker request rate")
    p.add_argument("--concurrency", type=int, default=32, help="attacker requests in flight at most")
    p.add_argument("--loris", type=int, default=6, help="slow-loris connections held during the attack")
    p.add_argument("--honest", type=int, default=20)
    p.add_argument("--think-s", type=float, default=0.5, help="mean honest 'training' time between download and upload")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--baseline-s", type=float, default=30.0)
    p.add_argument("--tail-s", type=float, default=2.0)
    p.add_argument("--after-s", type=float, default=15.0,
                   help="honest phones alone again after the attack, measured like the baseline")
    p.add_argument("--soak-s", type=float, default=None,
                   help="attack for this long (sets --requests to rps x soak-s): shows whether memory plateaus")
    p.add_argument("--rss-every-s", type=float, default=5.0, help="spacing of the reported server RSS curve")
    p.add_argument("--window-s", type=float, default=30.0, help="honest latency is also reported per window this long")
    p.add_argument("--max-update-bytes", type=int, default=1 << 20)
    p.add_argument("--request-timeout-s", type=float, default=5.0)
    p.add_argument("--attacker-nice", type=int, default=10, help="niceness of the attacker process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="attack")
    args = p.parse_args()
    if args.soak_s is not None:
        args.requests = int(args.rps * args.soak_s)
    result = run(args)
    print(report(result))
    from bench.common import write

    print(f"wrote {write(args.out, result)}")


if __name__ == "__main__":
    main()
