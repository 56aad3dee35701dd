"""``fedfleet simulate``: a server on a loopback port and a fleet of phones.

The server runs in this process, on the fleet's event loop, or (``server_process``, wall clock
only) in a child process of its own, as a deployed server would: the fleet and the server then
use a core each. On the virtual clock it must share the fleet's process (one clock). Both ways of
serving it are in fedfleet.serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_runtime import aio
from device_runtime.data import Dataset, load_dataset
from device_runtime.limits import open_file_limit
from device_runtime.profiles import ProfileSpec
from device_runtime.vclock import VirtualClock, WallClock
from fedfleet.output import RoundTable, summarize, write_run
from fedfleet.serving import ServerProcess, serve_here
from server.config import ServerConfig
from server.privacy import task_release

if TYPE_CHECKING:  # the fleet (torch) and the server are imported where they run: see simulate, ServerProcess
    from device_runtime.fleet import FleetConfig, FleetResult

AUTO_SERVER_PROCESS_PHONES = 1000  # server_process "auto": its own process from this fleet size on


@dataclass(frozen=True)
class SimulateConfig:
    phones: int = 50
    rounds: int = 10
    sample: float = 0.5  # fraction of phones whose updates each round waits for
    dataset: str = "digits"
    model: str = "cnn"
    partition: str = "iid"
    quantity_skew: float = 0.0
    attack: str = "none"  # Byzantine phones: none | signflip | scale:F | noise:STD | labelflip
    attack_fraction: float = 0.0  # share of phones that attack
    robust: str = "none"  # server rule: none | normbound:C | median | trimmed:B | krum:F | multikrum:F[:M]
    local_epochs: int = 5
    batch_size: int = 8
    lr: float = 0.1
    prox_mu: float = 0.0
    seed: int = 0
    workers: int = 2
    trainer: str = "batched"  # batched (vmap across phones on one version) | pool (one phone at a time)
    runtime: str = "torch"
    out: str = "runs/latest"
    mode: str = "sync"  # sync | async (FedBuff)
    concurrency: int = 20  # async: phones training at once
    buffer: int = 10  # async: updates per merge
    staleness: str = "poly:0.5"  # async: constant | inverse | poly:A | hinge:A:B
    max_staleness: int = 20
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi
    server_lr: float = 1.0
    devices: str = "none"  # none | default | PATH.csv: emulated device speeds, links, availability
    compute_ms: float = 5.0  # default devices: mean ms per training sample
    diurnal: float = 0.0  # default devices: fraction of phones only available at night
    dropout: float = 0.0  # default devices: probability of vanishing mid-task
    clock: str = "auto"  # wall | virtual | auto (virtual when devices are emulated)
    hours: float = 0.0  # stop the fleet after this much (virtual) time; 0 = when the rounds are done
    server_process: str = "auto"  # auto | yes | no: the server in a child process (wall clock only; see use_server_process)
    inline_model: bool = True  # phones take the model in the check-in's answer (no GET /v1/model)
    chain_checkin: bool | None = None  # phones check in again with their upload (None: see FleetConfig)
    start_spread_s: float = 60.0  # virtual clock: phones first check in at seeded times in [0, this)
    # update codec and privacy (the task tells phones how to encode; see protocol/FORMAT.md)
    clip: float | None = None  # L2 clipping norm C of each update
    noise: str | None = None  # gaussian | laplace (default gaussian when a noise level is given)
    noise_multiplier: float | None = None  # local DP noise std = z * C ...
    epsilon: float | None = None  # ...or calibrated to this epsilon per release, at delta
    delta: float = 1e-5
    topk: float | None = None  # fraction of each tensor sent (top-k by magnitude)
    randk: float | None = None  # ...or a random fraction (unbiased, rescaled)
    quant_bits: int = 32  # 32 | 8 | 4 | 2 | 1 (stochastic, per-chunk scales)
    error_feedback: bool = False  # keep what sparsification dropped for the next update
    compress: bool = False  # zlib over the payload
    quant_rounding: str = "stochastic"  # stochastic (unbiased) | nearest (deterministic; for error feedback)
    quant_scale: str = "max"  # max | fit (least-squares scale per chunk; needs quant_rounding nearest)
    epsilon_budget: float = 0.0  # stop scheduling a phone past this local epsilon (0 = no limit)
    central_clip: float = 0.0  # central DP on the server (DP-FedAvg): clip ...
    central_noise_multiplier: float = 0.0  # ... and noise the sum

    def codec(self) -> dict[str, Any]:
        """The EncoderConfig fields phones are told to use (empty = dense float32)."""
        c: dict[str, Any] = {}
        if self.clip is not None:
            c["clip"] = self.clip
        if self.noise_multiplier is not None or self.epsilon is not None or self.noise is not None:
            c["noise"] = self.noise or "gaussian"
            if c["noise"] == "laplace":
                c["clip_ord"] = 1
            if self.noise_multiplier is not None:
                c["noise_multiplier"] = self.noise_multiplier
            else:
                c.update(epsilon=self.epsilon, delta=self.delta)
        if self.topk is not None and self.randk is not None:
            raise ValueError("choose --topk or --randk, not both")
        if self.topk is not None or self.randk is not None:
            c.update(sparsify="topk" if self.topk is not None else "randk", density=self.topk or self.randk)
        if self.quant_bits != 32:
            c["quant_bits"] = self.quant_bits
        if self.error_feedback:
            c["error_feedback"] = True
        if self.compress:
            c["compress"] = True
        if self.quant_rounding not in ("stochastic", "nearest"):
            raise ValueError("quant_rounding must be stochastic or nearest")
        if self.quant_rounding == "nearest":
            c["stochastic_rounding"] = False
        if self.quant_scale != "max":
            c["quant_scale"] = self.quant_scale
        return c
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
            # Over-selection guards against stragglers and dropouts; phones without emulated devices
            # have neither, so the extra phones' work would only be thrown away.
            over_selection=ServerConfig.over_selection if self.devices != "none" else 1.0,
            checkin_retry_s=5.0 if self.virtual else 0.25,
            # Long polls on the wall clock only, held up to 25 s: a phone left out of a round waits for
            # the next one in one request (at 10,000 phones, rounds take ~20 s; a 5 s hold cost ~1.8
            # check-ins per update).
            checkin_hold_s=0.0 if self.virtual else 25.0,
            data_dir=data_dir,
            sqlite_sync="normal",  # an emulation's state need not survive a power cut, only a crash
            mode=self.mode,
            concurrency=self.concurrency,
            buffer_size=self.buffer,
            staleness=self.staleness,
            max_staleness=self.max_staleness,
            server_optimizer=self.server_optimizer,
            server_lr=self.server_lr,
            codec=self.codec(),
            robust=self.robust,
            dp_delta=self.delta,
            epsilon_budget=self.epsilon_budget,
            central_clip=self.central_clip,
            central_noise_multiplier=self.central_noise_multiplier,
        )
        return base.replace(**self.server) if self.server else base

    @property
    def use_server_process(self) -> bool:
        if self.server_process not in ("auto", "yes", "no"):
            raise ValueError("server_process must be auto, yes or no")
        if self.server_process == "yes" and self.virtual:
            raise ValueError("server_process yes needs the wall clock: a virtual clock is shared in one process "
                             "(use --clock wall, or --server-process no)")
        # auto: measured with bench_flower on 2 cores, its own process gave 10,000 phones 1.3x the
        # updates/s and 100 phones nothing (their rounds are latency-bound, not CPU-bound).
        return not self.virtual and (self.server_process == "yes" or (
            self.server_process == "auto" and (os.cpu_count() or 1) >= 2 and self.phones >= AUTO_SERVER_PROCESS_PHONES))

    @property
    def virtual(self) -> bool:
        if self.clock not in ("auto", "wall", "virtual"):
            raise ValueError("clock must be auto, wall or virtual")
        return self.clock == "virtual" or (self.clock == "auto" and self.devices != "none")

    def fleet_config(self) -> FleetConfig:
        from device_runtime.fleet import FleetConfig

        return FleetConfig(
            phones=self.phones,
            partition=self.partition,
            quantity_skew=self.quantity_skew,
            attack=self.attack,
            attack_fraction=self.attack_fraction,
            seed=self.seed,
            workers=self.workers,
            trainer=self.trainer,
            runtime=self.runtime,
            hours=self.hours,
            inline_model=self.inline_model,
            chain_checkin=self.chain_checkin,
            start_spread_s=self.start_spread_s,
            server_here=not self.use_server_process,
            devices=self.devices,
            profile_spec=ProfileSpec(compute_ms=self.compute_ms, diurnal=self.diurnal, dropout=self.dropout),
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
    t0 = time.perf_counter()
    open_file_limit()  # raised before a server process starts, so that it inherits the limit too
    child = ServerProcess() if cfg.use_server_process else None  # first: it starts while this process does
    try:
        # The fleet's side (torch) is imported here, after the server process is on its way.
        from device_runtime.fleet import run_fleet
        from device_runtime.runtimes.torch_runtime import torch_runtime_for_task

        data = load_dataset(cfg.dataset, seed=cfg.seed)
        out = Path(cfg.out)
        server_cfg = cfg.server_config(data, str(out / "server"))
        if cfg.runtime != "torch":  # phones run the exported artifacts: export them for this task
            server_cfg = server_cfg.replace(bundle_dir=str(ensure_bundle(cfg, data, out / "bundle")))
        _fresh_state(out / "server")
        clock = VirtualClock() if cfg.virtual else WallClock()
        async with contextlib.AsyncExitStack() as stack:
            url = (await child.serve(server_cfg, data) if child is not None
                   else await stack.enter_async_context(serve_here(server_cfg, data, clock)))
            result = await run_fleet(url, data, cfg.fleet_config(), torch_runtime_for_task,
                                     on_round=table or (lambda r: None), clock=clock)
            if child is not None:
                child.check_alive()
    finally:
        if child is not None:
            await child.stop()
    summary = summarize(result.rounds, result.devices, time.perf_counter() - t0)
    summary["config"] = dataclasses.asdict(cfg)
    summary["dataset_sizes"] = {"train": len(data.y_train), "test": len(data.y_test)}
    summary["clock"] = "virtual" if cfg.virtual else "wall"
    summary["server_process"] = cfg.use_server_process
    summary["event_loop"] = aio.running_loop_name()
    summary["emulation"] = {
        "checkins": sum(d.checkins for d in result.devices),
        "train_compute_s": round(result.train_compute_s, 3),
        "train_fraction": round(result.train_compute_s / summary["wall_s"], 4) if summary["wall_s"] else None,
    }
    summary["privacy"] = privacy_summary(task_release(server_cfg.codec), server_cfg, result.rounds)
    write_run(out, result.rounds, result.devices, summary)
    return result, summary


def ensure_bundle(cfg: SimulateConfig, data: Dataset, path: Path) -> Path:
    """Export the task's bundle into ``path`` unless an intact one for the same task is there."""
    from export.build import ExportConfig, export_bundle
    from export.bundle import verify_bundle
    from export.manifest import BundleError

    try:
        m = verify_bundle(path)
        if (m.model, m.input_shape, m.num_classes, m.seed) == (cfg.model, data.input_shape, data.num_classes, cfg.seed):
            return path
    except (BundleError, FileNotFoundError, ValueError):
        pass
    export_bundle(ExportConfig(cfg.model, data.name, data.input_shape, data.num_classes, seed=cfg.seed,
                               batch_size=min(cfg.batch_size, 64), lr=cfg.lr), path)
    return path


def _fresh_state(path: Path) -> None:
    """A simulation starts from version 0: drop the server state of an earlier run in ``out``."""
    for name in ("server.sqlite", "server.sqlite-wal", "server.sqlite-shm", "metrics.jsonl"):
        (path / name).unlink(missing_ok=True)


def run(cfg: SimulateConfig) -> dict[str, Any]:
    table = RoundTable(total=cfg.rounds)
    try:
        _, summary = aio.run(simulate(cfg, table))
    finally:
        table.close()
    return summary


def privacy_summary(release: Any, server_cfg: ServerConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The DP parameters of a run and what they cost, for summary.json."""
    last = rounds[-1] if rounds else {}
    return {
        "mechanism": release.mechanism if release is not None else None,
        "clip": server_cfg.codec.get("clip"),
        "noise_multiplier": release.noise_multiplier if release is not None else None,
        "delta": server_cfg.dp_delta,
        "epsilon_max": last.get("epsilon_max"),
        "epsilon_median": last.get("epsilon_median"),
        "central": {"clip": server_cfg.central_clip, "noise_multiplier": server_cfg.central_noise_multiplier,
                    "epsilon": last.get("central_epsilon")} if server_cfg.central_noise_multiplier else None,
        "codec": dict(server_cfg.codec),
    }
