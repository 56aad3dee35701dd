"""An update's way through a coordinator: refused (``UpdateRejected``, mapped to a 4xx), accepted
and waiting to be merged (``Contribution``), merged into a published version (``Published``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedfleet.server.aggregation import Params
from fedfleet.server.metrics import RoundRecord


class UpdateRejected(Exception):
    """An upload the coordinator refuses; ``status`` is the HTTP code, ``reason`` a short tag."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class Contribution:
    """One accepted update waiting to be merged."""

    phone: str
    update_id: str
    delta: Params
    num_examples: int
    train_loss: float | None
    latency_s: float
    staleness: int = 0
    wire_bytes: int = 0  # the update's body as it crossed the wire
    base_version: int = 0
    norm: float | None = None  # the update's L2 norm, as the upload checked it (None: not known)
    state: Params = field(default_factory=dict)  # the phone's batch norm statistics after training (absolute)

    def info(self) -> dict[str, Any]:
        return {"num_examples": self.num_examples, "train_loss": self.train_loss, "latency_s": self.latency_s,
                "staleness": self.staleness, "wire_bytes": self.wire_bytes, "base_version": self.base_version}


@dataclass(frozen=True)
class Published:
    """A version that was just merged, for evaluation and the round record."""

    version: int
    params: Params
    record: RoundRecord
