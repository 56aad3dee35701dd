"""One typed config for the server; defaults in one place, loadable from TOML."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServerConfig:
    # --- the task: which model, trained how -------------------------------------------
    model: str = "cnn"  # export.models name: mlp | cnn | mobilenet
    input_shape: tuple[int, int, int] = (1, 8, 8)  # C, H, W of one example
    num_classes: int = 10
    seed: int = 0  # initial parameters are drawn from this seed
    local_epochs: int = 5  # sent to phones with each task
    batch_size: int = 8
    lr: float = 0.1  # client SGD learning rate
    prox_mu: float = 0.0  # FedProx proximal weight; 0 = FedAvg
    # --- synchronous rounds -------------------------------------------------------------
    rounds: int = 10  # 0 = run until stopped
    sample_fraction: float = 0.5  # fraction of registered phones that must report per round
    min_cohort: int = 1  # never fewer than this many phones per round
    over_selection: float = 1.3  # hand out work to this many times the target (stragglers)
    round_timeout_s: float = 60.0  # close with what arrived (if >= min_updates) after this
    min_updates: int = 1
    example_cap: int = 10_000  # an update weighs min(num_examples, example_cap)
    server_lr: float = 1.0  # new = old + server_lr * weighted mean of deltas
    # --- limits -------------------------------------------------------------------------
    max_update_bytes: int = 16 << 20  # bodies over this get 413
    max_examples: int = 10_000_000  # a phone claiming more is refused (400)
    checkin_retry_s: float = 1.0  # how long a phone without work should wait
    # --- state ---------------------------------------------------------------------------
    data_dir: str | None = None  # SQLite file and metrics live here; None = in memory
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")
        if self.over_selection < 1:
            raise ValueError("over_selection must be at least 1")
        if self.min_cohort < 1 or self.min_updates < 1:
            raise ValueError("min_cohort and min_updates must be at least 1")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 = forever)")
        for name in ("lr", "server_lr", "round_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number")
        if self.example_cap < 1 or self.max_update_bytes < 1024:
            raise ValueError("example_cap must be >= 1 and max_update_bytes >= 1024")

    def train_plan(self) -> dict[str, Any]:
        """The local-training part of a task, as sent to phones."""
        return {
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "prox_mu": self.prox_mu,
        }

    def replace(self, **changes: Any) -> ServerConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown server settings: {sorted(unknown)}")
        if "input_shape" in changes:
            changes["input_shape"] = tuple(changes["input_shape"])
        return dataclasses.replace(self, **changes)


def load_toml(path: str | Path, section: str = "server") -> dict[str, Any]:
    """Read one section of a TOML file (the whole file when it has no such table)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    sub = data.get(section, data)
    if not isinstance(sub, dict):
        raise ValueError(f"{path}: [{section}] must be a table")
    return sub
