"""The merge as a seam: a ``Strategy`` turns the updates of one merge into the next global model.

A strategy is pure: (parameters, its own state, the updates with their weights, staleness and
norms) -> (new parameters, new state, metrics). It knows nothing of HTTP, rounds, the store or
the clock; the coordinator calls it in both modes (a sync round's cohort, an async buffer of K)
and does the rest: versioning, encoding, records and durable storage, including the state it
returns (optimizer moments survive a restart with the version they belong to).

A user subclasses ``Strategy`` and implements ``aggregate`` (as Flower's ``Strategy.aggregate_fit``);
the built-ins (server/strategies.py) are its first users.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    """One accepted update, as a strategy sees it."""

    delta: Params  # new - old parameters of the phone's training (float32 off the wire, or float64)
    num_examples: int  # as the phone claimed it
    examples: float  # the example weight: num_examples capped at ServerConfig.example_cap
    weight: float  # examples x the staleness weight (async: FedBuff's down-weighting; sync: examples)
    staleness: int  # versions published between the update's base and this merge (sync: 0)
    norm: float | None  # its L2 norm as the upload checked it (None: not known, e.g. restored after a crash)
    phone: str  # who sent it, for reports naming suspects


@dataclass(frozen=True)
class MergeContext:
    """Where a merge happens: the version it starts from (the result is ``version + 1``)."""

    version: int
    mode: str  # sync | async
    seed: int  # ServerConfig.seed

    def rng(self) -> np.random.Generator:
        """The merge's own seeded generator: the same seed and version draw the same numbers,
        so a restarted server merges a version exactly as an uninterrupted one would."""
        return np.random.default_rng([self.seed, self.version])


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced. ``params``: the same names, shapes and dtypes as the parameters given;
    ``state``: tensors kept for the next merge (e.g. optimizer moments; {} = none), stored with the
    version; ``metrics``: JSON values added to the round record's ``extra``."""

    params: Params
    state: Params = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """How the server merges. Subclass it and implement ``aggregate``; give it to the server as a
    Python object (``ServerConfig(strategy=MyStrategy())``) or as ``--strategy MODULE:ATTR``."""

    @property
    def min_updates(self) -> int:
        """Fewest updates ``aggregate`` can merge; async mode refuses a buffer_size below it."""
        return 1

    @property
    def name(self) -> str:
        """Stored with the strategy's state, and shown in logs."""
        return type(self).__name__

    @abstractmethod
    def aggregate(self, params: Params, state: Params, updates: Sequence[Update], ctx: MergeContext) -> MergeResult:
        """Merge ``updates`` (at least ``min_updates`` of them) into ``params``, given the ``state``
        this strategy returned at the previous merge ({} at the first one, or after a restart
        from a version stored without state). Must not modify its arguments."""


class StrategyError(ValueError):
    """A strategy's result the server cannot publish (not a MergeResult; wrong names, shapes or dtypes)."""


def check_result(strategy: Strategy, params: Params, result: Any) -> MergeResult:
    """``result`` if it is a MergeResult whose parameters match ``params`` tensor for tensor."""
    who = f"strategy {strategy.name}"
    if not isinstance(result, MergeResult):
        raise StrategyError(f"{who}: aggregate returned {type(result).__name__}, not a MergeResult")
    if set(result.params) != set(params):
        raise StrategyError(f"{who}: parameters named {sorted(result.params)}, expected {sorted(params)}")
    for name, old in params.items():
        new = result.params[name]
        if not isinstance(new, np.ndarray) or new.shape != old.shape or new.dtype != old.dtype:
            got = f"{new.dtype} {new.shape}" if isinstance(new, np.ndarray) else type(new).__name__
            raise StrategyError(f"{who}: parameter {name} is {got}, expected {old.dtype} {old.shape}")
    for name, value in result.state.items():
        if not isinstance(value, np.ndarray):
            raise StrategyError(f"{who}: state {name} is {type(value).__name__}, not a numpy array")
    return result
