"""The training plan: what a task tells a phone to do with its data (FORMAT.md, "HTTP usage").

A task's ``train`` object is ``{"local_epochs", "batch_size", "lr", "prox_mu", "codec"}``; the
first four are a ``TrainPlan`` (``codec``: the ``EncoderConfig`` fields the update is encoded
with). Their defaults and limits are defined here once: the server checks its configuration
with them when it is made, an admin's plan change with them before it applies, and a phone
builds the plan it trains with from them, so no task a server hands out is one a phone refuses.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedfleet.protocol.errors import ProtocolError

MAX_LOCAL_EPOCHS = 1000  # passes over a phone's data per task: more is a typo, and a phone would train for hours
MAX_BATCH_SIZE = 1 << 16


class InvalidPlan(ProtocolError):
    """A training plan value out of its type or limits (``TrainPlan``); the message names the field."""

    reason = "bad_plan"


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # JSON true is not 1


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Each field's check and what it must be, in words for the error message.
PLAN_LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "local_epochs": (lambda v: _whole(v) and 1 <= v <= MAX_LOCAL_EPOCHS, f"a whole number from 1 to {MAX_LOCAL_EPOCHS}"),
    "batch_size": (lambda v: _whole(v) and 1 <= v <= MAX_BATCH_SIZE, f"a whole number from 1 to {MAX_BATCH_SIZE}"),
    "lr": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "prox_mu": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
}


def check_plan_value(name: str, value: Any) -> None:
    """Raise ``InvalidPlan`` ("batch_size must be a whole number from 1 to 65536, got 0") unless
    ``value`` is a valid ``name`` of the plan."""
    ok, words = PLAN_LIMITS[name]
    if not ok(value):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise InvalidPlan(f"{name} must be {words}, got {shown}")


@dataclass(frozen=True)
class TrainPlan:
    """Local training hyper-parameters, sent by the server with each task; checked when made."""

    local_epochs: int = 5  # passes over the phone's data per task
    batch_size: int = 8
    lr: float = 0.1  # plain SGD
    prox_mu: float = 0.0  # FedProx proximal weight (Li et al. 2020); 0 = FedAvg

    def __post_init__(self) -> None:
        for f in fields(self):
            check_plan_value(f.name, getattr(self, f.name))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainPlan:
        """The plan in a task's ``train`` object (other keys, such as ``codec``, are not the plan's);
        a missing field is ``InvalidPlan``."""
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise InvalidPlan(f"the training plan lacks {missing}")
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PLAN_FIELDS = tuple(PLAN_LIMITS)
