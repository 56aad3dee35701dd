"""Byzantine phones against the real server: the attack works on FedAvg, robust rules resist it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedfleet.simulate import SimulateConfig, simulate


async def test_robust_rules_resist_noise_attackers(tmp_path: Path) -> None:
    base = SimulateConfig(phones=10, rounds=3, sample=1.0, model="mlp", attack="noise:5", attack_fraction=0.3,
                          workers=1, out=str(tmp_path / "none"))
    plain, _ = await simulate(base)
    robust, _ = await simulate(dataclasses.replace(base, robust="median", out=str(tmp_path / "median")))
    acc_plain, acc_robust = plain.rounds[-1]["accuracy"], robust.rounds[-1]["accuracy"]
    assert acc_plain < 0.5 < acc_robust  # the attack works, and the median shrugs it off
    # The per-version report names the three attackers as suspects.
    assert all(r["robust_suspects"] >= 3 for r in robust.rounds)
