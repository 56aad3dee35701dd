"""The ``meta`` object an update carries in its header (FORMAT.md, "HTTP usage").

POST /update sends one "update" message whose meta is
``{"base_version", "num_examples", "round", "train_loss", "update_id"}`` (canonical order:
sorted), possibly with more keys of the application's own. The server checks it with
``check_update_meta`` before using any of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedfleet.protocol.errors import MalformedMessage

UPDATE_META_KEYS = ("base_version", "num_examples", "round", "train_loss", "update_id")
MAX_UPDATE_ID_LEN = 128


def _nonneg_int(meta: Mapping[str, Any], key: str, minimum: int = 0) -> None:
    value = meta[key]
    if type(value) is not int or value < minimum:
        raise MalformedMessage(f"meta.{key} must be an int >= {minimum}, got {value!r}")


def check_update_meta(meta: Mapping[str, Any]) -> None:
    """Raise ``MalformedMessage`` unless ``meta`` has the update keys, well typed:
    update_id a non-empty string, base_version/round ints >= 0, num_examples int >= 1,
    train_loss a finite number or null. Other keys are the application's business and
    pass through unchecked."""
    missing = sorted(set(UPDATE_META_KEYS) - set(meta))
    if missing:
        raise MalformedMessage(f"update meta lacks keys {missing}")
    update_id = meta["update_id"]
    if not isinstance(update_id, str) or not 0 < len(update_id) <= MAX_UPDATE_ID_LEN:
        raise MalformedMessage(f"meta.update_id must be a string of 1..{MAX_UPDATE_ID_LEN} characters")
    _nonneg_int(meta, "base_version")
    _nonneg_int(meta, "round")
    _nonneg_int(meta, "num_examples", minimum=1)
    loss = meta["train_loss"]
    if loss is not None and (type(loss) not in (int, float) or not math.isfinite(loss)):
        raise MalformedMessage(f"meta.train_loss must be a finite number or null, got {loss!r}")
