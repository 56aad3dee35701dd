"""What a fleet hands back: its result, the errors that end it early (carrying what it saw), and
the summary.json keys of a run against a running server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import aiohttp

from fedfleet.device_runtime.data import Dataset
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.phone_stats import PhoneStats
from fedfleet.device_runtime.protocol_client import ServerError
from fedfleet.protocol import EncoderConfig
from fedfleet.protocol.codec.encoder import resolve_noise_multiplier


@dataclass
class FleetResult:
    rounds: list[dict[str, Any]]  # the round records published after the fleet joined, in order
    devices: list[PhoneStats]
    train_compute_s: float = 0.0  # CPU time of the training arithmetic (the emulation's physical floor)
    task: dict[str, Any] = dataclasses.field(default_factory=dict)  # the server's task as it served it
    joined_after_round: int = 0  # rounds the server had merged when the fleet joined (not counted)
    event_loop: str = ""  # uvloop | asyncio
    # FleetConfig.register_in_bulk: registration's wall seconds, phones built at most at once, releases
    population: dict[str, Any] = dataclasses.field(default_factory=dict)


class FleetError(Exception):
    """The fleet could not run to its end. ``result``: what it saw until then (its rounds and its
    phones' counts), to be written out like any run's; None when nothing ran."""

    def __init__(self, message: str, result: FleetResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class NamesTaken(FleetError):
    """The server already has phones of these names (registered by an earlier fleet or phone, which
    was given their tokens: a name's token is handed out once, so nobody else can act as it)."""


class ServerGone(FleetError):
    """The server stopped answering and did not come back while the phones kept trying."""


def _why(exc: BaseException) -> str:
    """An error in a few words: its text, or its type when it has none (aiohttp's often have none)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and not isinstance(exc, ServerError) else text or type(exc).__name__


def fleet_summary(result: FleetResult, cfg: FleetConfig, data: Dataset, wall_s: float, *, server: str,
                  train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``fedfleet simulate`` adds to summary.json (fedfleet.output.summarize's keys), for a fleet
    against a running server: the same keys where they apply (config, dataset_sizes, clock,
    event_loop, emulation, privacy), and ``server`` in place of ``server_process`` (the server is
    not this command's): its URL, the rounds it had merged before the fleet joined, and the task
    it served (which a fleet does not configure: its model, mode, plan, codec, rounds)."""
    task = result.task
    codec = dict((task.get("train") or {}).get("codec") or {})
    enc = EncoderConfig.from_mapping(codec)
    z = resolve_noise_multiplier(enc)
    noised = enc.noise is not None and z is not None
    last = result.rounds[-1] if result.rounds else {}
    return {
        "config": {**dataclasses.asdict(cfg), "dataset": data.name, "train_overrides": dict(train_overrides or {})},
        "dataset_sizes": {"train": len(data.y_train), "test": len(data.y_test)},
        "clock": "wall",
        "event_loop": result.event_loop,
        "emulation": {
            "checkins": sum(d.checkins for d in result.devices),
            "train_compute_s": round(result.train_compute_s, 3),
            "train_fraction": round(result.train_compute_s / wall_s, 4) if wall_s else None,
        },
        "privacy": {
            "mechanism": enc.noise if noised else None,
            "clip": codec.get("clip"),
            "noise_multiplier": z if noised else None,
            "delta": task.get("dp_delta"),
            "epsilon_max": last.get("epsilon_max"),
            "epsilon_median": last.get("epsilon_median"),
            # central DP is the server's setting, not in its task: what its records say it spent
            "central": {"epsilon": last["central_epsilon"]} if last.get("central_epsilon") is not None else None,
            "codec": codec,
        },
        "server": {
            "url": server.rstrip("/"),
            "joined_after_round": result.joined_after_round,
            "task": {k: v for k, v in task.items() if k != "params"},
        },
    }
