"""Canonical JSON for the message header, and its strict parser.

Encoders in every language must emit the same header bytes for the same message, so the
JSON form is pinned down (FORMAT.md, "Header JSON"):

* no whitespace: separators "," and ":";
* ASCII only: other characters as \\uXXXX escapes (lowercase hex, surrogate pairs above
  U+FFFF); escapes \\" \\\\ \\b \\f \\n \\r \\t; other controls as \\u00XX; "/" not escaped;
* key order: top level kind, meta, tensors; each tensor name, dtype, shape, encoding, then
  the encoding's own keys in the order FORMAT.md lists, then nbytes; inside meta, keys
  sorted by code point, recursively;
* integers in [-(2**53 - 1), 2**53 - 1] as plain decimals, floats finite and written as
  Python's ``repr`` writes them (shortest round-trip digits; FORMAT.md spells out when
  it uses an exponent), true/false/null as such.

Python's ``json.dumps`` with these options produces exactly that once ``meta`` has been
normalised by ``canonical_meta``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedfleet.protocol.errors import MalformedMessage, ProtocolError

MAX_SAFE_INT = (1 << 53) - 1  # beyond this, JavaScript numbers lose integers
HEADER_KEYS = ("kind", "meta", "tensors")


class _NotPlain(Exception):
    """``_plain_meta`` met something only ``_general_meta`` handles (or rejects with a path)."""


def _plain_meta(value: Any) -> Any:
    """``canonical_meta`` for plain JSON values (exact dict/list/str/int/float/bool/None), the
    common case, without building error paths; anything else raises ``_NotPlain``."""
    t = type(value)
    if t is str or t is bool or value is None:
        return value
    if t is int:
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value
        raise _NotPlain
    if t is float:
        if math.isfinite(value):
            return value
        raise _NotPlain
    if t is dict:
        for k in value:
            if type(k) is not str:
                raise _NotPlain
        return {k: _plain_meta(value[k]) for k in sorted(value)}
    if t is list:
        return [_plain_meta(v) for v in value]
    raise _NotPlain


def canonical_meta(value: Any, path: str = "meta") -> Any:
    """Normalise ``meta`` to JSON types with keys sorted; ValueError on what JSON (or a
    JavaScript peer) cannot carry exactly."""
    try:
        return _plain_meta(value)
    except _NotPlain:
        return _general_meta(value, path)


def _general_meta(value: Any, path: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise ValueError(f"{path}: integer {value} is outside +-(2**53 - 1)")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value} is not a finite number")
        return float(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{path}: object keys must be strings")
        return {k: _general_meta(value[k], f"{path}.{k}") for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_general_meta(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{path}: {type(value).__name__} cannot go into the JSON header")


def canonical_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_header(kind: str, meta: Mapping[str, Any], tensors: Sequence[Mapping[str, Any]] | str) -> bytes:
    """The header's canonical JSON; ``tensors`` may come as the canonical JSON of the list
    already (a sender's repeated tensor list): the bytes are the same as from the list."""
    if isinstance(tensors, str):
        return ('{"kind":' + canonical_json(kind) + ',"meta":' + canonical_json(canonical_meta(dict(meta)))
                + ',"tensors":' + tensors + "}").encode("ascii")
    header = {"kind": kind, "meta": canonical_meta(dict(meta)), "tensors": list(tensors)}
    return canonical_json(header).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedMessage("header repeats a key within one object")
    return out


def _reject_constant(name: str) -> Any:
    raise MalformedMessage(f"header contains {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf: not a number JSON can carry
        raise MalformedMessage(f"header number {text} overflows a double")
    return value


_HEADER_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                                   object_pairs_hook=_no_duplicates)  # built once: json.loads builds one per call


def parse_header(raw: bytes, kinds: Sequence[str], max_tensors: int) -> dict[str, Any]:
    """Strict parse: UTF-8 JSON object with exactly kind/meta/tensors, no duplicate keys,
    no NaN/Infinity. Key order is not checked (decoders accept any order)."""
    try:
        header = _HEADER_DECODER.decode(raw.decode("utf-8"))
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # includes UnicodeDecodeError, JSONDecodeError
        raise MalformedMessage(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != set(HEADER_KEYS):
        raise MalformedMessage(f"header must be an object with exactly the keys {list(HEADER_KEYS)}")
    if header["kind"] not in kinds:
        raise MalformedMessage(f"header.kind must be one of {list(kinds)}")
    if not isinstance(header["meta"], dict):
        raise MalformedMessage("header.meta must be an object")
    tensors = header["tensors"]
    if not isinstance(tensors, list) or len(tensors) > max_tensors:
        raise MalformedMessage(f"header.tensors must be a list of at most {max_tensors} entries")
    return header
