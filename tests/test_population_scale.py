"""Population scale: a fleet's phones as columns until built, built exactly as they were eagerly;
an idle registered phone costing little on either side of the wire (tracemalloc, not a timer);
a population that cannot fit refused in one line with its estimate."""

from __future__ import annotations

import base64
import gc
import json
import math
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.device_runtime import aio
from fedfleet.device_runtime.data import Dataset, load_dataset, partition
from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.fleet import SharedTasks
from fedfleet.device_runtime.fleet_plan import FleetConfig, plan_fleet
from fedfleet.device_runtime.profiles import NETWORKS, DeviceProfile, ProfileSpec
from fedfleet.device_runtime.vclock import VirtualClock
from fedfleet.population import check_population, estimate_bytes
from fedfleet.protocol.signing import PhoneKey, signature_ok, signed_text
from fedfleet.server import phone_cache
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig

WALL_CLOCK_FIELDS = ("aggregate_ms",)  # measured in wall time on purpose (server processing time)


def _eager_profiles(n: int, rng: np.random.Generator, spec: ProfileSpec) -> list[DeviceProfile]:
    """One DeviceProfile per phone, drawn one by one as fleets drew them before profiles were columns."""
    mu = math.log(spec.compute_ms) - spec.compute_sigma**2 / 2
    compute = rng.lognormal(mu, spec.compute_sigma, size=n)
    names = list(NETWORKS)
    kinds = rng.choice(len(names), size=n, p=[NETWORKS[k][0] for k in names])
    noise = rng.lognormal(0.0, spec.net_sigma, size=(n, 3))
    nightly = rng.random(n) < spec.diurnal
    starts = (rng.normal(22.0, 1.5, size=n)) % 24
    hours = np.clip(rng.normal(7.0, 1.5, size=n), 2.0, 12.0)
    out = []
    for i in range(n):
        _, up, down, rtt = NETWORKS[names[kinds[i]]]
        out.append(DeviceProfile(
            ms_per_sample=float(compute[i]), up_mbps=up * float(noise[i, 0]), down_mbps=down * float(noise[i, 1]),
            rtt_ms=rtt * float(noise[i, 2]), window_start_h=float(starts[i]) if nightly[i] else 0.0,
            window_hours=float(hours[i]) if nightly[i] else 24.0, dropout=spec.dropout))
    return out


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shards:2"])
def test_phones_built_from_the_columns_equal_phones_built_eagerly(digits: Dataset, scheme: str) -> None:
    spec = ProfileSpec(diurnal=0.5, dropout=0.05)
    cfg = FleetConfig(phones=60, partition=scheme, seed=11, devices="default", profile_spec=spec,
                      attack="signflip", attack_fraction=0.2, quantity_skew=0.0)
    plan = plan_fleet(digits, cfg, virtual=True)
    # the eager oracle: every part, generator and profile built up front, in the same order of draws
    rng = np.random.default_rng(cfg.seed)
    parts = partition(digits.y_train, cfg.phones, scheme, rng)
    generators = rng.spawn(cfg.phones)
    profiles = _eager_profiles(cfg.phones, rng, spec)
    for i in range(cfg.phones):
        (x, y), phone_rng, _ = plan.phone(i)
        np.testing.assert_array_equal(x, digits.x_train[parts[i]])
        np.testing.assert_array_equal(y, digits.y_train[parts[i]])
        np.testing.assert_array_equal(phone_rng.random(8), generators[i].random(8))
        assert phone_rng.spawn(1)[0].random() == generators[i].spawn(1)[0].random()  # the encoder's stream too
        assert plan.profile(i) == profiles[i]
    attackers = rng.choice(cfg.phones, size=int(round(cfg.attack_fraction * cfg.phones)), replace=False)
    assert plan.attackers == set(attackers.tolist())
    np.testing.assert_array_equal(plan.starts, rng.uniform(0.0, cfg.start_spread_s, cfg.phones))


def test_a_phones_key_is_derived_again_the_same_and_signs_verifiably(digits: Dataset) -> None:
    plan = plan_fleet(digits, FleetConfig(phones=4), virtual=True)
    keys = [plan.phone(i)[2] for i in range(4)]
    assert len({k.public_b64() for k in keys}) == 4
    assert plan.phone(2)[2].public_b64() == keys[2].public_b64()  # made again from the fleet's secret
    assert plan_fleet(digits, FleetConfig(phones=4), virtual=True).phone(2)[2].public_b64() != keys[2].public_b64()
    headers = keys[1].headers("phone-00001", 3, "u1", b"body")
    sig = base64.b64decode(headers["X-Fedfleet-Signature"])
    text = signed_text("phone-00001", 3, "u1", b"body", int(headers["X-Fedfleet-Nonce"]))
    assert signature_ok(base64.b64decode(keys[1].public_b64()), sig, text)
    assert not signature_ok(base64.b64decode(PhoneKey().public_b64()), sig, text)


def _traced(snapshot: tracemalloc.Snapshot, before: tracemalloc.Snapshot, where: str | None) -> int:
    """Bytes allocated between the snapshots and still held, by files under ``where`` (None: all)."""
    stats = snapshot.compare_to(before, "filename")
    return sum(s.size_diff for s in stats if where is None or where in s.traceback[0].filename)


async def test_a_registered_idle_phone_holds_little_on_either_side(make_server: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 phones of a fleet registered over HTTP with the real server, then idle: what each
    holds, fleet side and server side, counted by tracemalloc. The server's caches of tokens and
    keys are made small here (the default holds 2^17 phones) so that they are full, as they are
    in a fleet of a million."""
    monkeypatch.setattr(phone_cache, "CACHE_ENTRIES", 256)
    n = 2000
    data = load_dataset(f"synthetic:{5 * n}", seed=0)
    client = await make_server()
    url = str(client.make_url("/")).rstrip("/")
    clock = VirtualClock()
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        plan = plan_fleet(data, FleetConfig(phones=n, devices="default"), virtual=True)
        tasks = SharedTasks()
        phones = []
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                shard, rng, key = plan.phone(i)
                p = PhoneClient(session, url, f"phone-{i:05d}", shard, None, rng, profile=plan.profile(i),
                                clock=clock, key=key, num_classes=data.num_classes)
                await p.register()
                tasks.share(p)
                phones.append(p)
            gc.collect()
            after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert all(p.token for p in phones)
    fleet = _traced(after, before, "/device_runtime/") / n
    server = _traced(after, before, "/server/") / n
    total = _traced(after, before, None) / n
    # measured 2.1 KB, 0.04 KB and 3.0 KB a phone (its generator, profile, client and counters; a
    # phone's data copied and its task parsed for itself were ~4.5 and ~5.8 KB more, the server's
    # caches of every phone ~0.3 KB)
    assert fleet < 2_500, f"{fleet:.0f} B a phone on the fleet's side"
    assert server < 200, f"{server:.0f} B a phone on the server's side"
    assert total < 4_000, f"{total:.0f} B a phone in all"


def test_a_population_that_cannot_fit_is_refused_with_its_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"1,000,000 phones need about 9\.0 GB .* but 2\.0 GB is available"):
        check_population(1_000_000, available=2_000_000_000)
    check_population(1_000_000, available=estimate_bytes(1_000_000))  # fits exactly: no error
    assert main(["simulate", "--phones", "100000000", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedfleet simulate: error: phones (--phones): 100,000,000 phones "
                                               "need about"), err
    assert "GB is available" in err[0]


def _lazy_run(tmp_path: Path, name: str, lazy: bool, spread_s: float = 60.0, rounds: int = 0,
              hours: float = 2 / 60) -> tuple[Any, list[dict[str, Any]], bytes]:
    cfg = SimulateConfig(phones=120, dataset="digits", model="mlp", local_epochs=1, mode="async", concurrency=8,
                         buffer=4, rounds=rounds, hours=hours, devices="default", dropout=0.1, diurnal=0.5, seed=3,
                         out=str(tmp_path / name), server={"rest_after_update_s": 60.0},
                         register_when_active=lazy, start_spread_s=spread_s)
    result, _ = aio.run(simulate(cfg))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows, (tmp_path / name / "devices.csv").read_bytes()


def test_phones_registered_when_active_run_as_phones_registered_up_front(tmp_path: Path) -> None:
    """The same seeded run whether every phone registers before the first check-in or each at its
    own first check-in; only the bytes of the registrations land in the rounds they happen in."""
    _, eager, eager_devices = _lazy_run(tmp_path, "eager", lazy=False)
    result, lazy, lazy_devices = _lazy_run(tmp_path, "lazy", lazy=True)
    assert len(result.devices) == 120 and len(eager) >= 5
    assert lazy_devices == eager_devices

    def without_bytes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        skip = {*WALL_CLOCK_FIELDS, "bytes_up", "bytes_down"}
        return [{k: v for k, v in r.items() if k not in skip} for r in rows]

    assert without_bytes(lazy) == without_bytes(eager)
    for field in ("bytes_up", "bytes_down"):
        assert sum(r[field] for r in lazy) == sum(r[field] for r in eager)


def test_phones_that_never_become_active_never_register(tmp_path: Path) -> None:
    """First check-ins spread over a virtual hour, the run capped at 5 merges: the phones whose start
    comes after the end are never built nor registered."""
    result, rows, _ = _lazy_run(tmp_path, "capped", lazy=True, spread_s=3600.0, rounds=5, hours=1.0)
    assert len(rows) == 5
    assert 8 <= len(result.devices) < 60, len(result.devices)
    with sqlite3.connect(tmp_path / "capped" / "server" / "server.sqlite") as db:
        registered = db.execute("SELECT COUNT(*) FROM phones").fetchone()[0]
    assert registered == len(result.devices)
