"""Byzantine phones against the real server: the attack works on FedAvg, robust rules resist it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from bench.bench_byzantine import true_attackers
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig


async def test_robust_rules_resist_noise_attackers(tmp_path: Path) -> None:
    base = SimulateConfig(phones=10, rounds=3, sample=1.0, model="mlp", attack="noise:5", attack_fraction=0.3,
                          workers=1, out=str(tmp_path / "none"))
    plain, _ = await simulate(base)
    robust, _ = await simulate(base.replace(robust="median", out=str(tmp_path / "median")))
    acc_plain, acc_robust = plain.rounds[-1]["accuracy"], robust.rounds[-1]["accuracy"]
    assert acc_plain < 0.5 < acc_robust  # the attack works, and the median shrugs it off
    # The per-version report names the three attackers as suspects.
    assert all(r["robust_suspects"] >= 3 for r in robust.rounds)


def _suspects(row: dict[str, Any], reason: str | None = None) -> set[str]:
    return {str(s["update"]) for s in row["robust"]["suspects"] if reason is None or s["reason"] == reason}


async def test_report_names_sign_flippers_by_direction(tmp_path: Path) -> None:
    # Sign-flipped updates have honest norms: only the direction test can name them.
    cfg = SimulateConfig(phones=10, rounds=2, sample=1.0, model="mlp", attack="signflip", attack_fraction=0.2,
                         robust="normbound+trimmed", workers=1, out=str(tmp_path / "run"))
    attackers = set(true_attackers(cfg))
    assert len(attackers) == 2
    result, _ = await simulate(cfg)
    for row in result.rounds:
        assert row["updates"] == 10 and row["robust"]["rule"] == "normbound+trimmed"
        assert _suspects(row, "direction") == attackers
        assert not _suspects(row, "norm_z") & attackers  # their norms look honest


async def test_default_multikrum_sizes_f_to_each_async_merge(tmp_path: Path) -> None:
    cfg = SimulateConfig(phones=10, rounds=3, model="mlp", attack="noise:5", attack_fraction=0.2, mode="async",
                         concurrency=6, buffer=6, robust="multikrum", workers=1, out=str(tmp_path / "run"))
    attackers = set(true_attackers(cfg))
    result, _ = await simulate(cfg)
    assert len(result.rounds) == 3
    with sqlite3.connect(tmp_path / "run" / "server" / "server.sqlite") as db:  # who each version merged
        merged = {v: {p for p, in db.execute("SELECT phone FROM merged WHERE version = ?", (v,))}
                  for v in (r["version"] for r in result.rounds)}
    seen = 0
    for row in result.rounds:
        report = row["robust"]
        n = report["updates"]
        assert report["fallback"] is None and report["krum_f"] == min(n // 4, (n - 3) // 2)
        assert _suspects(row, "krum") <= merged[row["version"]]  # suspects are updates of this merge
        assert attackers & merged[row["version"]] <= _suspects(row)  # every attacker merged here is named
        seen += len(attackers & merged[row["version"]])
    assert seen > 0  # the attackers did take part
