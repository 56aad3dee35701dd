"""A few phones, a few rounds, the real server on loopback: accuracy must rise above chance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfleet.protocol import decode_message
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig, merge_config
from tests.conftest import MakeClient, register, update_body, zero_delta


async def test_simulate_learns_digits(tmp_path: Path) -> None:
    cfg = SimulateConfig(phones=8, rounds=4, sample=0.5, model="mlp", lr=0.1, out=str(tmp_path), workers=1)
    result, summary = await simulate(cfg)
    accs = [r["accuracy"] for r in result.rounds]
    assert len(accs) == 4 and accs[-1] >= 0.85  # chance is 0.1; these 4 rounds reach ~0.95
    assert accs[-1] > accs[0]
    assert all(r["updates"] >= 4 for r in result.rounds)
    # Bytes are HTTP bodies: at least one dense float32 update per merged phone.
    dense = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert all(r["bytes_up"] >= r["updates"] * dense for r in result.rounds)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("round", "accuracy", "loss", "updates", "bytes_up", "bytes_down", "latency_p50_s",
                "latency_p95_s", "wall_s"):
        assert all(key in r for r in rows), key
    assert json.loads((tmp_path / "summary.json").read_text())["final_accuracy"] == accs[-1]
    devices = (tmp_path / "devices.csv").read_text().splitlines()
    assert devices[0].startswith("phone,") and len(devices) == 9
    assert summary["phones_participated"] >= 4


async def test_non_iid_dirichlet_with_fedprox_runs(tmp_path: Path) -> None:
    cfg = SimulateConfig(phones=10, rounds=3, sample=0.6, model="mlp", partition="dirichlet:0.5",
                         prox_mu=0.01, out=str(tmp_path), workers=1)
    result, _ = await simulate(cfg)
    assert result.rounds[-1]["accuracy"] > 0.3


def test_config_file_and_flags_merge() -> None:
    cfg = merge_config({"phones": 7, "rounds": 3}, {"rounds": 5, "lr": None})
    assert (cfg.phones, cfg.rounds, cfg.lr) == (7, 5, SimulateConfig().lr)
    with pytest.raises(ValueError, match="unknown settings"):
        merge_config({"phonez": 3}, {})


def test_cli_simulate_smoke(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[simulate]\nphones = 6\nmodel = "mlp"\n[simulate.server]\nover_selection = 1.0\n')
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedfleet.cli", "simulate", "--config", str(toml), "--rounds", "2",
         "--out", str(out), "--seed", "3", "--server-process", "yes"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout and "bytes up" in proc.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["phones"] == 6 and summary["config"]["server"] == {"over_selection": 1.0}
    # The server ran in its own process and wrote its state where the in-process one would.
    assert summary["server_process"] is True and (out / "server" / "server.sqlite").exists()
    assert summary["event_loop"] == "uvloop"  # fedfleet's processes run on uvloop where it is installed


def test_server_process_needs_the_wall_clock(tmp_path: Path) -> None:
    cfg = SimulateConfig(devices="default", server_process="yes", out=str(tmp_path))
    with pytest.raises(ValueError, match="wall clock"):
        _ = cfg.use_server_process
    assert not SimulateConfig(devices="default", server_process="auto").use_server_process  # virtual: in-process
    assert not SimulateConfig(phones=50).use_server_process  # auto: small fleets share the loop
    assert SimulateConfig(phones=10_000).use_server_process == ((os.cpu_count() or 1) >= 2)
    with pytest.raises(ValueError, match="auto, yes or no"):
        _ = SimulateConfig(server_process="maybe").use_server_process


def test_cli_rejects_bad_flags(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedfleet.cli", "simulate", "--partition", "zipf:2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown partition" in proc.stderr


async def test_server_resumes_from_data_dir(make_server: MakeClient, tmp_path: Path) -> None:
    """A merged round survives a restart on the same data dir: its version, the next round, the model
    and the phone's registration, all seen through the HTTP API."""
    client = await make_server(data_dir=str(tmp_path), sample_fraction=1.0)
    _, auth, task = await register(client, "x")
    assert (await client.post("/v1/checkin", headers=auth)).status == 200
    before = decode_message(await (await client.get("/v1/model", headers=auth)).read()).tensors
    resp = await client.post("/v1/update", data=update_body(task, zero_delta(task, 1.0)), headers=auth)
    assert resp.status == 200, await resp.text()
    status = await (await client.get("/v1/status")).json()
    assert status["version"] == 1 and status["round"] == 2
    merged = decode_message(await (await client.get("/v1/model", headers=auth)).read()).tensors
    for name, value in before.items():  # one phone, server_lr 1: the model moved by its delta
        np.testing.assert_allclose(merged[name], value + 1.0, rtol=1e-6)
    await client.close()
    again = await make_server(data_dir=str(tmp_path), sample_fraction=1.0)
    status = await (await again.get("/v1/status")).json()
    assert status["version"] == 1 and status["round"] == 2
    resumed = decode_message(await (await again.get("/v1/model", headers=auth)).read()).tensors
    assert resumed.keys() == merged.keys()
    for name, value in merged.items():
        assert np.array_equal(resumed[name], value), name
    with pytest.raises(ValueError, match="different task"):
        make_app(ServerConfig(model="cnn", input_shape=(1, 8, 8), num_classes=10, data_dir=str(tmp_path)))


def test_codec_flags_reach_the_task() -> None:
    codec = SimulateConfig(quant_bits=1, topk=0.06, error_feedback=True, quant_rounding="nearest",
                           quant_scale="fit").codec()
    assert codec["stochastic_rounding"] is False and codec["quant_scale"] == "fit" and codec["quant_bits"] == 1
    assert "stochastic_rounding" not in SimulateConfig(quant_bits=8).codec()  # unbiased by default
    with pytest.raises(ValueError, match="quant_rounding"):
        SimulateConfig(quant_rounding="down").codec()
