"""``fedfleet simulate --secure-agg`` end to end: real phones (device_runtime's client and
secure-aggregation client) against the real server. The merged model is plain FedAvg of the
same updates up to the integer rounding; bad combinations are one-line errors before anything runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.device_runtime import aio
from fedfleet.protocol import decode_message
from fedfleet.protocol.secagg import group_params
from fedfleet.server.store import Store
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig

MODULUS_BITS = 24
CLIP = 100.0  # above every update's norm here: nothing is clipped, only rounded


def _final_model(out: Path) -> tuple[int, dict[str, np.ndarray]]:
    store = Store(str(out / "server" / "server.sqlite"))
    latest = store.latest_version()
    assert latest is not None
    return latest[0], decode_message(latest[1]).tensors


def test_secure_simulate_merges_fedavg_of_the_same_updates(tmp_path: Path) -> None:
    common = {"phones": 6, "rounds": 1, "sample": 1.0, "model": "mlp", "local_epochs": 1, "clip": CLIP,
              "inline_model": True, "chain_checkin": False}
    secure = SimulateConfig(**common, out=str(tmp_path / "secure"), secure_agg=True,  # type: ignore[arg-type]
                            server={"secagg_modulus_bits": MODULUS_BITS, "secagg_step_timeout_s": 60.0})
    plain = SimulateConfig(**common, out=str(tmp_path / "plain"), server={"example_cap": 1})  # type: ignore[arg-type]
    result, summary = aio.run(simulate(secure))
    aio.run(simulate(plain))
    row = result.rounds[-1]
    assert row["updates"] == 6 and row["secagg_survivors"] == 6 and row["secagg_aborted"] == 0
    assert row["secagg_bytes_up"] > row["update_bytes"] > 0 and row["secagg_unmask_ms"] > 0
    assert summary["privacy"]["secure_agg"] is True
    v_secure, secure_model = _final_model(tmp_path / "secure")
    v_plain, plain_model = _final_model(tmp_path / "plain")
    assert v_secure == v_plain == 1
    dim = sum(p.size for p in plain_model.values())
    params = group_params("g", 6, dim, clip=CLIP, modulus_bits=MODULUS_BITS)
    # the mean of six roundings, each below one integer unit per rotated coordinate; rotated back,
    # a coordinate sums one block of them, each over sqrt(block)
    step = math.sqrt(max(params.blocks)) / params.scale
    for name, p in plain_model.items():
        assert not np.array_equal(secure_model[name], p) or p.size < 20  # rounded, so not bit-identical
        np.testing.assert_allclose(secure_model[name], p, rtol=0, atol=step + 1e-6)


@pytest.mark.parametrize("flags, words", [
    (["--secure-agg", "--topk", "0.1"], ["top-k"]),
    (["--secure-agg", "--mode", "async", "--buffer", "30", "--concurrency", "10"], ["buffer_size", "concurrency"]),
    (["--secure-agg", "--mode", "gossip"], ["--secure-agg", "gossip"]),
    (["--secure-agg", "--secagg-threshold", "0.4"], ["secagg_threshold"]),
    (["--secure-agg", "--secagg-degree", "3"], ["secagg_degree"]),
    (["--secure-agg", "--central-clip", "1", "--central-noise-multiplier", "1"], ["central DP"]),
    (["--distributed-noise-multiplier", "1"], ["--secure-agg"]),
    (["--secure-agg", "--quant-bits", "8"], ["quant_bits", "do not apply"]),
])
def test_bad_secure_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              flags: list[str], words: list[str]) -> None:
    rc = main(["simulate", "--out", str(tmp_path / "run"), *flags])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("fedfleet simulate: error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()


def test_fleet_refuses_secure_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fleet", "--server", "http://127.0.0.1:1", "--secure-agg"])
    assert info.value.code == 2 and "--secure-agg" in capsys.readouterr().err


def test_phones_that_drop_between_steps_leave_the_rounds_merging(tmp_path: Path) -> None:
    """Emulated devices on the virtual clock, 30% of tasks vanishing: a secure task's phone
    vanishes after sharing keys or after its masked upload; rounds still merge (or abort and
    start again), and the records count both."""
    cfg = SimulateConfig(phones=10, rounds=3, sample=1.0, model="mlp", local_epochs=1, clip=10.0, secure_agg=True,
                         devices="default", dropout=0.3, out=str(tmp_path / "run"))
    result, _ = aio.run(simulate(cfg))
    rows = result.rounds
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["updates"] >= 2 for r in rows)
    assert sum(r["secagg_dropped"] + r["secagg_aborted"] for r in rows) > 0
    assert sum(d.drops for d in result.devices) > 0


def test_async_secure_groups_merge_in_simulate_with_dropping_phones(tmp_path: Path) -> None:
    """``simulate --secure-agg --mode async``: emulated devices on the virtual clock, groups of
    K = 4 merging as buffers with their staleness, phones vanishing between steps."""
    cfg = SimulateConfig(phones=12, rounds=4, mode="async", concurrency=8, buffer=4, model="mlp", local_epochs=1,
                         clip=10.0, secure_agg=True, devices="default", dropout=0.2, out=str(tmp_path / "run"))
    result, summary = aio.run(simulate(cfg))
    rows = result.rounds
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and all(r["mode"] == "async" for r in rows)
    assert all(2 <= r["secagg_survivors"] <= 4 and r["updates"] == r["secagg_survivors"] for r in rows)
    assert len({r["secagg_group"] for r in rows}) == 4  # one group, one buffer
    assert sum(r["secagg_dropped"] + r["secagg_aborted"] for r in rows) > 0
    assert summary["privacy"]["secure_agg"] is True
