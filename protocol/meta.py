"""The ``meta`` object an update carries in its header (FORMAT.md, "HTTP usage").

POST /update sends one "update" message whose meta is
``{"base_version", "num_examples", "round", "train_loss", "update_id"}`` (canonical order:
sorted), possibly with more keys of the application's own. The server checks it with
``check_update_meta`` before using any of it: a refused meta is a 400 with the error's reason
(``bad_meta``, or ``bad_examples`` for ``num_examples``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedfleet.protocol.errors import MalformedMessage

UPDATE_META_KEYS = ("base_version", "num_examples", "round", "train_loss", "update_id")
MAX_UPDATE_ID_LEN = 128


class BadUpdateMeta(MalformedMessage):
    """An update's meta lacks a key or has one of the wrong type or range."""

    reason = "bad_meta"


class BadExamples(BadUpdateMeta):
    """``num_examples`` is not a whole number from 1 to the receiver's limit."""

    reason = "bad_examples"


def _int_at_least(meta: Mapping[str, Any], key: str, minimum: int = 0, maximum: int | None = None,
                  error: type[BadUpdateMeta] = BadUpdateMeta) -> None:
    value = meta[key]
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        wanted = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise error(f"meta.{key} must be an int {wanted}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def check_update_meta(meta: Mapping[str, Any], max_examples: int | None = None) -> None:
    """Raise ``BadUpdateMeta`` unless ``meta`` has the update keys, well typed:
    update_id a non-empty string, base_version/round ints >= 0, num_examples an int >= 1
    (and <= ``max_examples`` when given: ``BadExamples``), train_loss a finite number or null
    (JSON true is not a number). Other keys are the application's business and pass through
    unchecked."""
    missing = sorted(set(UPDATE_META_KEYS) - set(meta))
    if missing:
        raise BadUpdateMeta(f"update meta lacks keys {missing} (see protocol/FORMAT.md)")
    update_id = meta["update_id"]
    if not isinstance(update_id, str) or not 0 < len(update_id) <= MAX_UPDATE_ID_LEN:
        raise BadUpdateMeta(f"meta.update_id must be a string of 1..{MAX_UPDATE_ID_LEN} characters")
    _int_at_least(meta, "base_version")
    _int_at_least(meta, "round")
    _int_at_least(meta, "num_examples", 1, max_examples, BadExamples)
    loss = meta["train_loss"]
    if loss is not None and (type(loss) not in (int, float) or not math.isfinite(loss)):
        raise BadUpdateMeta(f"meta.train_loss must be a finite number or null, got {_shown(loss)}")
