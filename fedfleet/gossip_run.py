"""``fedfleet simulate --mode gossip``: a fleet that learns without a global model (docs/gossip.md).

The server runs on this event loop as for FedAvg, but only enrols phones, hands out the initial
model and relays messages (server/relay.py). Each round, every phone that is around (its device
profile's window, a seeded dropout draw) trains locally from its own model, posts its message
once to the relay, which hands it to each neighbour of the round, fetches theirs, and takes one gossip step
(device_runtime/gossip.py). Rounds are synchronous: the round lasts as long as its slowest phone
(training time and link time of its real bytes, from its profile) on the virtual clock.

Each round's record keeps FedAvg's columns (accuracy and loss of the phones' average model,
bytes up and down as the relay counted them, ``updates``: the phones that took part, ``time_s``
on the virtual clock) and adds the spread over phones (``accuracy_mean``, ``accuracy_p10``,
``accuracy_p90``, over at most EVAL_PHONES phones drawn from the seed), ``consensus_distance``
and ``messages_dropped``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.clock import WallClock
from fedfleet.device_runtime.data import Dataset, load_dataset
from fedfleet.device_runtime.vclock import VirtualClock
from fedfleet.gossip_metrics import scores, traffic
from fedfleet.output import RoundTable, summarize, write_run
from fedfleet.serving import serve_here
from fedfleet.simulate import _fresh_state
from fedfleet.simulate_config import SimulateConfig

if TYPE_CHECKING:
    import aiohttp

    from fedfleet.device_runtime.gossip import GossipPhone
    from fedfleet.device_runtime.profiles import DeviceProfile
    from fedfleet.protocol.topology import Topology
    from fedfleet.server.evaluation import Evaluator

EVAL_PHONES = 10  # phones whose own models are scored each round (all of them in smaller fleets)
GOSSIP_STREAM = 22  # the run's generator for availability and evaluation draws: default_rng([seed, this])
T = TypeVar("T")
IDLE_S = 60.0  # a round in which no phone is around moves the clock on by this much (or to the next window)


@dataclasses.dataclass
class Fleet:
    phones: list[GossipPhone]
    profiles: list[DeviceProfile] | None
    shards: list[tuple[np.ndarray, np.ndarray]]


class Stop(asyncio.Event):
    """Set by a signal (``signum``): no further round begins, the outputs are written."""

    signum = 0


@dataclasses.dataclass
class GossipResult:
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    models: list[dict[str, np.ndarray]]  # each phone's model at the end, in phone order


async def gossip(cfg: SimulateConfig, table: RoundTable | None = None,
                 stop: Stop | None = None) -> GossipResult:
    """Run the gossip simulation (the server on this loop); write metrics.jsonl, devices.csv and
    summary.json into ``cfg.out``. ``stop``: once set, no further round begins."""
    import aiohttp

    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    server_cfg = cfg.server_config(data, str(Path(cfg.out) / "server"))
    _fresh_state(Path(cfg.out) / "server")
    clock = VirtualClock() if cfg.virtual else WallClock()
    async with serve_here(server_cfg, data, clock) as served, aiohttp.ClientSession() as session:
        rows, fleet = await run_phones(cfg, data, served.url, session, clock, table, stop=stop)
    return write_gossip_run(cfg, rows, fleet, time.perf_counter() - t0, stop.signum if stop is not None else 0)


async def run_phones(cfg: SimulateConfig, data: Dataset, url: str, session: aiohttp.ClientSession,
                     clock: VirtualClock | WallClock, table: RoundTable | None = None,
                     prefix: str = "phone", stop: asyncio.Event | None = None) -> tuple[list[dict[str, Any]], Fleet]:
    """``cfg.phones`` phones named ``{prefix}-00000``... gossiping through the relay at ``url`` for
    ``cfg.rounds`` rounds from the relay's next one (fewer once ``stop`` is set); their round
    records and the fleet."""
    from fedfleet.device_runtime.trainer import RuntimePool
    from fedfleet.server.evaluation import Evaluator

    evaluator = Evaluator((cfg.model, data.input_shape, data.num_classes), data.x_test, data.y_test, seed=cfg.seed,
                          loss=cfg.loss, metrics=cfg.metrics)
    fleet = await _enrol(cfg, data, url, session, prefix)
    first = await _open_round(session, url) + 1
    pool = RuntimePool(lambda: _runtime(cfg, data), size=cfg.workers)
    draws = np.random.default_rng([cfg.seed, GOSSIP_STREAM])
    first_down = sum(p.client.stats.bytes_down for p in fleet.phones)  # the initial model, counted in the first round
    rows: list[dict[str, Any]] = []
    clock.join()
    try:
        for r in range(first, first + cfg.rounds):
            if stop is not None and stop.is_set():
                break
            topology = await _topology(fleet, r)
            row = await _round(cfg, r, fleet, topology, pool, clock, draws, evaluator)
            row.update(await traffic(session, url, r, topology, row.pop("delivered_expected")))
            if r == first:
                row["bytes_down"] += first_down
            rows.append(row)
            if table is not None:
                table(row)
    finally:
        clock.leave()
        pool.close()
    return rows, fleet


def write_gossip_run(cfg: SimulateConfig, rows: list[dict[str, Any]], fleet: Fleet, wall_s: float,
                     signum: int = 0) -> GossipResult:
    devices = [p.client.stats for p in fleet.phones]
    summary = summarize(rows, devices, wall_s)
    if signum:
        summary["interrupted"] = signal.Signals(signum).name
    summary["config"] = cfg.to_dict()
    summary["clock"] = "virtual" if cfg.virtual else "wall"
    summary["gossip"] = {"algorithm": cfg.gossip, "topology": rows[0]["topology"] if rows else None,
                         "final_consensus_distance": rows[-1]["consensus_distance"] if rows else None}
    write_run(Path(cfg.out), rows, devices, summary)
    return GossipResult(rows, summary, [p.x for p in fleet.phones])


def run_gossip(cfg: SimulateConfig) -> dict[str, Any]:
    """``gossip`` with the live round table (the command line). SIGINT or SIGTERM ends the run after
    the round in progress, its outputs written (summary["interrupted"] names the signal); a second
    one exits at once."""
    table = RoundTable(total=cfg.rounds)
    try:
        result, _ = aio.run(until_signal(lambda stop: gossip(cfg, table, stop), "simulate"))
    finally:
        table.close()
    return result.summary


async def until_signal(run: Callable[[Stop], Awaitable[T]], command: str) -> tuple[T, int]:
    """``run(stop)``, with SIGINT and SIGTERM setting ``stop`` (the first) or exiting at once (a
    second: status 128 + signal); returns its result and the first signal (0: none)."""
    loop = asyncio.get_running_loop()
    stop = Stop()
    got: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if got:
            print(f"fedfleet {command}: {name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        got.append(signum)
        stop.signum = signum
        print(f"\nfedfleet {command}: {name}: stopping after the round in progress, then writing the outputs "
              f"({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again to exit at once)",
              file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await run(stop), (got[0] if got else 0)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _runtime(cfg: SimulateConfig, data: Dataset) -> Any:
    from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task

    return torch_runtime_for_task({"model": cfg.model, "input_shape": data.input_shape,
                                   "num_classes": data.num_classes, "loss": cfg.loss})


async def _enrol(cfg: SimulateConfig, data: Dataset, url: str, session: aiohttp.ClientSession, prefix: str) -> Fleet:
    """The fleet's phones (shards, generators, keys and profiles as plan_fleet draws them for a
    FedAvg fleet of the same seed), registered, each with the initial model. CHOCO-SGD compresses
    (and D-PSGD quantizes) with the codec of the server's task, as FedAvg phones encode their updates."""
    from fedfleet.device_runtime.emulated_device import PhoneClient
    from fedfleet.device_runtime.fleet_plan import plan_fleet
    from fedfleet.device_runtime.gossip import GossipPhone, check_codec
    from fedfleet.protocol import EncoderConfig, UpdateEncoder
    from fedfleet.protocol.topology import phone_names

    plan = plan_fleet(data, cfg.fleet_config(), cfg.virtual)
    phones, shards = [], []
    for i, name in enumerate(phone_names(prefix, cfg.phones)):
        shard, rng, key = plan.phone(i)
        client = PhoneClient(session, url, name, shard, None, rng, key=key, num_classes=data.num_classes)
        await client.register()
        codec = dict(client.task["train"].get("codec") or {})
        check_codec(cfg.gossip, codec)  # the server's task's codec
        encoder = UpdateEncoder(EncoderConfig.from_mapping(codec), rng.spawn(1)[0]) \
            if cfg.gossip == "choco" or (cfg.gossip == "dpsgd" and codec) else None
        phones.append(GossipPhone(client, cfg.gossip, await client.download(0), encoder=encoder,
                                  gamma=cfg.gossip_gamma, rho=cfg.admm_rho))
        x, y = shard
        shards.append((x, y))
    profiles = None if plan.profiles is None else [plan.profile(i) or DeviceProfile() for i in range(cfg.phones)]
    return Fleet(phones, profiles, shards)


async def _open_round(session: aiohttp.ClientSession, url: str) -> int:
    """The relay's open round (0 before any message): this fleet's rounds follow it."""
    async with session.get(f"{url}/v1/gossip/status") as resp:
        if resp.status == 404:
            raise ValueError(f"the server at {url} relays no gossip: start it with `fedfleet serve --mode gossip`")
        resp.raise_for_status()
        return int((await resp.json())["round"])


async def _topology(fleet: Fleet, r: int) -> Topology:
    """Round ``r``'s graph as the relay gives it to phones (and their public keys); its phones must be
    this fleet's."""
    import base64
    import json

    from fedfleet.protocol.topology import Topology

    _, payload, _ = await fleet.phones[0].client._request("GET", f"/v1/gossip/topology?round={r}")
    graph = json.loads(payload)
    names = tuple(graph["phones"])
    ours = tuple(p.name for p in fleet.phones)
    if names != ours:
        raise ValueError(f"the server's topology joins {len(names)} phones ({names[0]}, ...) but this fleet has "
                         f"{len(ours)} ({ours[0]}, ...): give --phones {len(names)} and the server's name prefix")
    keys = {name: base64.b64decode(k) for name, k in zip(names, graph["keys"], strict=True) if k}
    for p in fleet.phones:
        p.peer_keys = keys  # each phone checks its neighbours' signatures itself
    return Topology(str(graph["topology"]), names, frozenset((int(i), int(j)) for i, j in graph["edges"]))


def _around(fleet: Fleet, t: float, draws: np.random.Generator) -> list[int]:
    """The phones that take part in a round starting at ``t``: inside their window and not
    dropped out (one draw per phone per round, whether or not it is needed)."""
    u = draws.random(len(fleet.phones))
    if fleet.profiles is None:
        return list(range(len(fleet.phones)))
    return [i for i, p in enumerate(fleet.profiles) if p.wait_until_available(t) == 0 and u[i] >= p.dropout]


async def _round(cfg: SimulateConfig, r: int, fleet: Fleet, topology: Topology, pool: Any,
                 clock: VirtualClock | WallClock, draws: np.random.Generator, evaluator: Evaluator) -> dict[str, Any]:
    from fedfleet.device_runtime.runtimes import TrainConfig

    phones, names = fleet.phones, topology.names
    active = _around(fleet, clock.now(), draws)
    here = set(active)
    train = TrainConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, prox_mu=cfg.prox_mu)
    jobs = []
    for i in active:
        start, mu = phones[i].train_start()  # ADMM: its centre, and its own proximal weight
        plan = train if mu is None else dataclasses.replace(train, prox_mu=mu)
        jobs.append(pool.train(start, *fleet.shards[i], plan, phones[i].client.rng))
    trained = await asyncio.gather(*jobs)
    for i, (delta, _) in zip(active, trained, strict=True):
        phones[i].train_step(delta)
        phones[i].client.stats.participations += 1
    neighbours = topology.neighbours(r)
    weights = topology.weights(r)
    link_s = {i: 0.0 for i in active}
    for i in active:  # in phone order: each phone's nonces, and so every byte, are the same run to run
        if not neighbours[i]:
            continue  # left out of this round's matching: nothing to say
        body = phones[i].message(r)
        await phones[i].post(r, body)  # uploaded once; the relay hands it to each neighbour
        link_s[i] += _link(fleet, i, len(body), uplink=True)
    for i in active:
        received = {}
        for j in neighbours[i]:
            msg = await phones[i].receive(r, names[j])
            if msg is not None:
                received[names[j]] = msg
                link_s[i] += _link(fleet, i, msg.wire_bytes, uplink=False)
        phones[i].absorb(received, {names[j]: float(weights[i, j]) for j in neighbours[i]})
    await clock.sleep(_duration(fleet, active, link_s, clock.now(), cfg.local_epochs))
    row: dict[str, Any] = {"round": r, "mode": "gossip", "algorithm": cfg.gossip, "topology": topology.spec,
                           "updates": len(active)}
    row.update(await asyncio.to_thread(scores, [p.x for p in phones], evaluator, draws, EVAL_PHONES))
    row["time_s"] = round(clock.now(), 3) if cfg.virtual else None  # virtual time only: wall time is not reproducible
    row["delivered_expected"] = sum(1 for i in active for j in neighbours[i] if j in here)
    return row


def _link(fleet: Fleet, i: int, nbytes: int, uplink: bool) -> float:
    return fleet.profiles[i].transfer_s(nbytes, uplink) if fleet.profiles is not None else 0.0


def _duration(fleet: Fleet, active: list[int], link_s: dict[int, float], t: float, epochs: int) -> float:
    """The round's length: its slowest phone's training and transfers; with nobody around, until
    the first phone's window opens (at least IDLE_S)."""
    if fleet.profiles is None:
        return 0.0
    profiles = fleet.profiles
    if not active:
        return max(IDLE_S, min(p.wait_until_available(t) for p in profiles))
    return max(profiles[i].train_s(len(fleet.shards[i][1]) * epochs) + link_s[i] for i in active)
