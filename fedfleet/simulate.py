"""``fedfleet simulate``: a server on a loopback port and a fleet of phones.

The server runs in this process, on the fleet's event loop, or (``server_process``, wall clock
only) in a child process of its own, as a deployed server would: the fleet and the server then
use a core each. On the virtual clock it must share the fleet's process (one clock). Both ways of
serving it are in fedfleet.serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.clock import WallClock
from fedfleet.device_runtime.data import Dataset, load_dataset
from fedfleet.device_runtime.vclock import VirtualClock
from fedfleet.output import RoundTable, summarize, write_run
from fedfleet.server.config import ServerConfig
from fedfleet.server.privacy import task_release
from fedfleet.serving import ServerProcess, serve_here
from fedfleet.simulate_config import SimulateConfig
from fedfleet.startup import Timeline
from fedfleet.tuning import parse_threads, set_torch_threads

if TYPE_CHECKING:  # the fleet (torch) and the server are imported where they run: see simulate, ServerProcess
    from fedfleet.device_runtime.fleet_result import FleetResult


async def simulate(cfg: SimulateConfig, table: RoundTable | None = None, *, interrupt: Interrupt | None = None,
                   torch_threads: int | None = None, data: Dataset | None = None,
                   timeline: Timeline | None = None, server: ServerProcess | None = None,
                   ) -> tuple[FleetResult, dict[str, Any]]:
    """Run the simulation and write its outputs (the trained model: OUT/final_weights.safetensors).
    ``interrupt`` (the command line): SIGINT and SIGTERM end the run early but cleanly (see Interrupt);
    summary["interrupted"] then names the signal. ``torch_threads``: set torch's threads process-wide
    once torch is loaded (fedfleet.tuning; the command line's 1); None leaves them as they are. A fleet
    of thousands of phones needs the process tuned first (fedfleet.tuning.tune_process, as the command
    line does). ``data``: cfg.dataset already loaded (fedfleet.task). ``timeline``: the stages reached
    are marked on it, and summary["startup"] is its record (fedfleet.startup). ``server``: the server
    process to serve in, started earlier (the command line starts it before it checks the task); by
    default one is started here when ``cfg.use_server_process``."""
    t0 = time.perf_counter()
    timeline = timeline if timeline is not None else Timeline()
    timeline.mark("simulate")
    child = server if server is not None else ServerProcess() if cfg.use_server_process else None  # first: it starts while this process does
    if interrupt is not None:
        interrupt.child = child
    try:
        with interrupt.installed() if interrupt is not None else contextlib.nullcontext():
            # The fleet's side (torch) is imported here, after the server process is on its way.
            from fedfleet.device_runtime import fleet as fleet_module
            from fedfleet.device_runtime.fleet_result import FleetResult
            from fedfleet.device_runtime.task_runtime import task_runtime_factory

            if torch_threads is not None:
                set_torch_threads(torch_threads)
            timeline.mark("fleet imported")
            if data is None:
                data = load_dataset(cfg.dataset, seed=cfg.seed, image_size=cfg.image_size)
            out = Path(cfg.out)
            server_cfg = cfg.server_config(data, str(out / "server"))
            if cfg.runtime != "torch":  # phones run the exported artifacts: export them for this task
                server_cfg = server_cfg.replace(bundle_dir=str(ensure_bundle(cfg, data, out / "bundle")))
            _fresh_state(out / "server")
            fleet_cfg = cfg.fleet_config()
            if fleet_cfg.register_in_bulk:  # the fleet registers its phones through the admin's bulk requests
                admin = server_cfg.admin_token or secrets.token_urlsafe(24)
                server_cfg, fleet_cfg = server_cfg.replace(admin_token=admin), replace(fleet_cfg, admin_token=admin)
            phones_model = task_runtime_factory(weights=_phone_weights(server_cfg, out), loss=cfg.loss)
            clock = VirtualClock() if cfg.virtual else WallClock()
            rows: list[dict[str, Any]] = []  # the rounds recorded so far, should the fleet be cancelled

            def on_round(row: dict[str, Any]) -> None:
                if not rows:
                    timeline.mark("round 1 merged")
                rows.append(row)
                if table is not None:
                    table(row)

            async with contextlib.AsyncExitStack() as stack:
                finish: Callable[[], Awaitable[int]]
                if child is not None:
                    url, finish = await child.serve(server_cfg, data), child.finish
                else:
                    served = await stack.enter_async_context(serve_here(server_cfg, data, clock))
                    url, finish = served.url, served.finish
                timeline.mark("server ready")

                async def registered() -> None:
                    timeline.mark("phones registered")

                # phones registering when first active (register_when_active) have no moment when all are
                # registered: the timeline then has no such stage (a barrier would register them all up front)
                fleet = asyncio.ensure_future(fleet_module.run_fleet(
                    url, data, fleet_cfg, phones_model, on_round=on_round, clock=clock,
                    registered=None if cfg.register_when_active else registered))
                if interrupt is not None:
                    interrupt.fleet_started(fleet, finish)
                try:
                    result = await fleet
                except asyncio.CancelledError:
                    if interrupt is None or not interrupt.cancelled_fleet:
                        raise
                    result = FleetResult(rounds=rows, devices=[])  # no round merged: no phone stats
                if child is not None:
                    child.check_alive()
    finally:
        if child is not None:
            await child.stop()
    timeline.mark("rounds done")
    summary = summarize(result.rounds, result.devices, time.perf_counter() - t0)
    if interrupt is not None and interrupt.signum:
        summary["interrupted"] = signal.Signals(interrupt.signum).name
    summary["config"] = cfg.to_dict()
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
    from fedfleet.task import FINAL_WEIGHTS, write_final_weights

    final = write_final_weights(server_cfg, out / "server", out / FINAL_WEIGHTS)
    summary["final_weights"] = None if final is None else {"path": str(final[1]), "version": final[0]}
    summary["startup"] = timeline.to_dict()
    summary["task"] = {"model": cfg.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                       "loss": cfg.loss or "cross_entropy", "metrics": cfg.metrics}
    write_run(out, result.rounds, result.devices, summary)
    return result, summary


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM during ``fedfleet simulate``. The first ends the run after the rounds
    already merged: the server's task is cut to them (fedfleet.serving.finish_task), so the server
    reports it finished, the fleet's phones leave, and the run's outputs are written as after a
    planned last round. Before any merge, it cancels the fleet instead (no round to keep). A second
    signal exits at once (exit status 128 + signal), killing the server process if there is one.
    Before the fleet starts, the first cancels the run."""

    def __init__(self) -> None:
        self.child: ServerProcess | None = None
        self.signum = 0
        self.cancelled_fleet = False
        self.fleet: asyncio.Future[Any] | None = None
        self.finish: Callable[[], Awaitable[int]] | None = None
        self.main: asyncio.Task[Any] | None = None
        self._finishing: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        self.main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def fleet_started(self, fleet: asyncio.Future[Any], finish: Callable[[], Awaitable[int]]) -> None:
        self.fleet, self.finish = fleet, finish
        if self.signum:  # a signal came while the server started: act on it now
            self._stop_fleet()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            print(f"fedfleet simulate: {name} again: exiting now, without writing the run's outputs",
                  file=sys.stderr, flush=True)
            if self.child is not None:
                self.child.kill()
            os._exit(128 + signum)
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(f"\nfedfleet simulate: {name}: stopping after the rounds done, then writing the outputs "
              f"({again} again to exit at once)", file=sys.stderr, flush=True)
        if self.fleet is None:
            if self.main is not None:
                self.main.cancel()
            return
        self._stop_fleet()

    def _stop_fleet(self) -> None:
        self._finishing = asyncio.ensure_future(self._finish_task())

    def _cancel(self) -> None:
        if self.fleet is not None and not self.fleet.done():
            self.cancelled_fleet = True
            self.fleet.cancel()

    async def _finish_task(self) -> None:
        assert self.finish is not None
        try:
            kept = await self.finish()
        except RuntimeError as exc:
            print(f"fedfleet simulate: could not end the server's task ({exc}); stopping the phones",
                  file=sys.stderr, flush=True)
            kept = 0
        if not kept:
            self._cancel()


def _phone_weights(server_cfg: ServerConfig, out: Path) -> str | None:
    """The server's initial model as safetensors for the emulated phones (their frozen parameters and
    state): phones load no torch (pickle) file, so a user's torch file is converted here."""
    if server_cfg.init_weights is None:
        return None
    from fedfleet.export.task_model import task_model
    from fedfleet.export.weights import save_weights

    model = task_model(server_cfg.model, server_cfg.input_shape, server_cfg.num_classes, server_cfg.seed,
                       server_cfg.init_weights)
    return str(save_weights(out / "init_weights.safetensors", model))


def ensure_bundle(cfg: SimulateConfig, data: Dataset, path: Path) -> Path:
    """Export the task's bundle into ``path`` unless an intact one for the same task is there."""
    from fedfleet.export.build import ExportConfig, export_bundle
    from fedfleet.export.bundle import verify_bundle
    from fedfleet.export.manifest import BundleError

    try:
        m = verify_bundle(path)
        same = (m.model, m.input_shape, m.num_classes, m.seed) == (cfg.model, data.input_shape, data.num_classes, cfg.seed)
        # a user's weights or loss may have changed under the same name: export anew
        if same and cfg.init_weights is None and cfg.loss is None:
            return path
    except (BundleError, FileNotFoundError, ValueError):
        pass
    export_bundle(ExportConfig(cfg.model, data.name, data.input_shape, data.num_classes, seed=cfg.seed,
                               batch_size=min(cfg.batch_size, 64), lr=cfg.lr,
                               weights=Path(cfg.init_weights) if cfg.init_weights else None, loss=cfg.loss), path)
    return path


def _fresh_state(path: Path) -> None:
    """A simulation starts from version 0: drop the server state of an earlier run in ``out``."""
    for name in ("server.sqlite", "server.sqlite-wal", "server.sqlite-shm", "metrics.jsonl"):
        (path / name).unlink(missing_ok=True)


class Interrupted(Exception):
    """A signal stopped the run before its fleet started: there is nothing to write."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} before the fleet started; nothing written")
        self.signum = signum


def run(cfg: SimulateConfig, interrupt: Interrupt | None = None, data: Dataset | None = None,
        show_table: bool = True, timeline: Timeline | None = None, server: ServerProcess | None = None,
        ) -> dict[str, Any]:
    """``simulate`` with the live round table, training on ``cfg.train_threads`` torch threads (the
    command line's run; see fedfleet.tuning); ``interrupt``: see ``simulate`` (a run it cancels before
    its fleet started raises Interrupted)."""
    table = RoundTable(total=cfg.rounds) if show_table else None
    threads = parse_threads(cfg.train_threads)
    try:
        _, summary = aio.run(simulate(cfg, table, interrupt=interrupt, torch_threads=threads, data=data,
                                      timeline=timeline, server=server))
    except asyncio.CancelledError:
        if interrupt is None or not interrupt.signum:
            raise
        raise Interrupted(interrupt.signum) from None
    finally:
        if table is not None:
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
        "secure_agg": server_cfg.secure_agg,
        "distributed": {"mechanism": "distributed discrete gaussian", "clip": server_cfg.secagg_clip,
                        "noise_multiplier": server_cfg.distributed_noise_multiplier,
                        "epsilon_max": last.get("distributed_epsilon_max"),
                        "epsilon_median": last.get("distributed_epsilon_median")}
        if server_cfg.distributed_noise_multiplier else None,
        "codec": dict(server_cfg.codec),
    }
