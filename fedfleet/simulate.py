"""``fedfleet simulate``: an in-process server on a loopback port and a fleet of phones."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from device_runtime.data import Dataset, load_dataset
from device_runtime.fleet import FleetConfig, FleetResult, run_fleet
from device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.output import RoundTable, summarize, write_run
from server.app import make_app
from server.config import ServerConfig


@dataclass(frozen=True)
class SimulateConfig:
    phones: int = 50
    rounds: int = 10
    sample: float = 0.5  # fraction of phones whose updates each round waits for
    dataset: str = "digits"
    model: str = "cnn"
    partition: str = "iid"
    quantity_skew: float = 0.0
    local_epochs: int = 5
    batch_size: int = 8
    lr: float = 0.1
    prox_mu: float = 0.0
    seed: int = 0
    workers: int = 2
    runtime: str = "torch"
    out: str = "runs/latest"
    server: dict[str, Any] = field(default_factory=dict)  # any other ServerConfig field

    def server_config(self, data: Dataset, data_dir: str | None) -> ServerConfig:
        base = ServerConfig(
            model=self.model,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            seed=self.seed,
            rounds=self.rounds,
            sample_fraction=self.sample,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            prox_mu=self.prox_mu,
            checkin_retry_s=0.25,
            data_dir=data_dir,
        )
        return base.replace(**self.server) if self.server else base

    def fleet_config(self) -> FleetConfig:
        return FleetConfig(
            phones=self.phones,
            partition=self.partition,
            quantity_skew=self.quantity_skew,
            seed=self.seed,
            workers=self.workers,
        )


def merge_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> SimulateConfig:
    """Defaults < TOML file < command-line flags (flags left unset do not override)."""
    known = {f.name for f in dataclasses.fields(SimulateConfig)}
    values = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    return SimulateConfig(**values)


async def simulate(cfg: SimulateConfig, table: RoundTable | None = None) -> tuple[FleetResult, dict[str, Any]]:
    if cfg.runtime != "torch":
        raise ValueError(f"runtime {cfg.runtime!r} is not available in simulate yet; use torch")
    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    out = Path(cfg.out)
    server_cfg = cfg.server_config(data, str(out / "server"))
    _fresh_state(out / "server")
    app = make_app(server_cfg, test_data=(data.x_test, data.y_test))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        result = await run_fleet(
            f"http://127.0.0.1:{port}",
            data,
            cfg.fleet_config(),
            torch_runtime_for_task,
            on_round=table or (lambda r: None),
        )
    finally:
        await runner.cleanup()
    summary = summarize(result.rounds, result.devices, time.perf_counter() - t0)
    summary["config"] = dataclasses.asdict(cfg)
    summary["dataset_sizes"] = {"train": len(data.y_train), "test": len(data.y_test)}
    write_run(out, result.rounds, result.devices, summary)
    return result, summary


def _fresh_state(path: Path) -> None:
    """A simulation starts from version 0: drop the server state of an earlier run in ``out``."""
    for name in ("server.sqlite", "server.sqlite-wal", "server.sqlite-shm", "metrics.jsonl"):
        (path / name).unlink(missing_ok=True)


def run(cfg: SimulateConfig) -> dict[str, Any]:
    _, summary = asyncio.run(simulate(cfg, RoundTable()))
    return summary
