"""``fedfleet simulate --mode gossip`` end to end: the real server's relay on loopback, phones with
real keys and eager training, device profiles on the virtual clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.device_runtime import aio
from fedfleet.gossip_run import GossipResult, gossip
from fedfleet.simulate_config import SimulateConfig

FIELDS = ("accuracy", "loss", "bytes_up", "bytes_down", "accuracy_p10", "accuracy_p90", "accuracy_mean",
          "consensus_distance", "messages_dropped", "updates", "time_s")


def _run(tmp: Path, **overrides: Any) -> GossipResult:
    values: dict[str, Any] = {"mode": "gossip", "phones": 6, "rounds": 3, "dataset": "digits", "model": "mlp",
                              "local_epochs": 1, "batch_size": 16, "workers": 2, "out": str(tmp), **overrides}
    return aio.run(gossip(SimulateConfig(**values)))


def test_seeded_runs_with_dropouts_are_reproducible_and_finite(tmp_path: Path) -> None:
    """Virtual clock, drawn device profiles, nightly windows and dropouts, CHOCO with top-k: two runs
    of one seed write the same metrics.jsonl byte for byte; every phone's model stays finite."""
    flags = {"devices": "default", "dropout": 0.3, "diurnal": 0.3, "gossip": "choco", "topk": 0.1,
             "gossip_gamma": 0.3, "topology": "regular:3", "rounds": 4}
    first = _run(tmp_path / "a", **flags)
    second = _run(tmp_path / "b", **flags)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    rows = first.rounds
    assert len(rows) == 4 and all(set(FIELDS) <= set(r) for r in rows)
    assert sum(r["messages_dropped"] for r in rows) > 0 and min(r["updates"] for r in rows) < 6  # phones were away
    assert rows[-1]["time_s"] > rows[0]["time_s"] > 0
    for model in first.models:
        assert all(np.isfinite(v).all() for v in model.values())
    for a, b in zip(first.models, second.models, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    other = _run(tmp_path / "c", **{**flags, "seed": 1})
    assert (tmp_path / "c" / "metrics.jsonl").read_bytes() != (tmp_path / "a" / "metrics.jsonl").read_bytes()
    assert other.rounds[-1]["accuracy"] is not None


def test_dpsgd_complete_graph_reaches_consensus_and_counts_bytes(tmp_path: Path) -> None:
    result = _run(tmp_path, topology="complete", rounds=2)
    rows = result.rounds
    assert all(r["consensus_distance"] < 1e-10 for r in rows)  # complete graph, everyone around: one model
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] > 0.1
    assert all(r["messages"] == 30 and r["messages_dropped"] == 0 for r in rows)  # 15 edges, both ways
    # every message is the whole model, posted once by each of the 6 phones and handed to its 5 neighbours:
    # the relay counted the bodies up once, and down five times plus its answers (headers are zlib-compressed,
    # so a message's size depends a little on its sender's name)
    assert 5 * rows[1]["bytes_up"] < rows[1]["bytes_down"] < 5 * rows[1]["bytes_up"] + 6 * 100
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == rows
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows) and summary["gossip"]["algorithm"] == "dpsgd"
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert (tmp_path / "report" / "gossip.png").stat().st_size > 1000 and "consensus_distance" in page


def test_admm_with_dropouts(tmp_path: Path) -> None:
    result = _run(tmp_path, gossip="admm", admm_rho=0.05, topology="ring", rounds=4, devices="default",
                  dropout=0.3, local_epochs=2)
    rows = result.rounds
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] and rows[-1]["algorithm"] == "admm"
    assert sum(r["messages_dropped"] for r in rows) > 0
    for model in result.models:
        assert all(np.isfinite(v).all() for v in model.values())


def test_time_varying_matchings(tmp_path: Path) -> None:
    from fedfleet.server.config import ServerConfig

    rows = _run(tmp_path, topology="matching", rounds=3, seed=5).rounds
    assert all(r["messages"] == 6 and r["messages_dropped"] == 0 for r in rows)  # 3 pairs, both ways
    topo = ServerConfig(model="mlp", topology="matching", gossip_phones=6, seed=5).gossip_topology()
    assert len({topo.edges(r["round"]) for r in rows}) > 1  # the pairs the phones used changed between rounds


def test_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    edges = tmp_path / "edges.txt"
    edges.write_text("phone-00000 phone-00001\nphone-00001 phone-00007\n")
    for argv, words in [
        (["--topology", f"edges:{edges}"], ["line 2: unknown phone 'phone-00007'"]),
        (["--topology", "star"], ["unknown topology 'star'"]),
        (["--gossip", "choco", "--topology", "matching"], ["static --topology"]),
        (["--topk", "0.01"], ["--gossip choco"]),
        (["--gossip", "choco", "--gossip-gamma", "2"], ["gossip_gamma (--gossip-gamma)"]),
        (["--attack", "signflip", "--attack-fraction", "0.5"], ["--attack is not taken in gossip mode"]),
        (["--gossip", "choco", "--clip", "1", "--noise-multiplier", "1"], ["--clip is not taken in gossip mode"]),
        (["--gossip", "admm", "--topology", "matching"], ["--gossip admm keeps state per neighbour"]),
        (["--gossip", "admm", "--prox-mu", "0.1"], ["leave out --prox-mu"]),
        (["--gossip", "admm", "--admm-rho", "0"], ["admm_rho (--admm-rho)"]),
        (["--gossip", "admm", "--quant-bits", "8"], ["admm sends whole float32 models"]),
        (["--gossip", "choco", "--topology", "ring-matchings"], ["static --topology, not ring-matchings"]),
    ]:
        rc = main(["simulate", "--mode", "gossip", "--phones", "4", "--out", str(tmp_path / "x"), *argv])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedfleet simulate: error: "), err
        assert all(w in lines[0] for w in words), lines[0]
        assert not (tmp_path / "x").exists() and "phones," not in out  # refused before the banner
    rc = main(["simulate", "--mode", "gossip", "--phones", "4", "--rounds", "1", "--model", "mlp",
               "--topology", "ring", "--local-epochs", "1", "--out", str(tmp_path / "ok")])
    assert rc == 0
    row = json.loads((tmp_path / "ok" / "metrics.jsonl").read_text())
    assert row["round"] == 1 and row["messages"] == 8
    rc = main(["simulate", "--mode", "gossip", "--phones", "4", "--rounds", "1", "--model", "mlp",
               "--topology", "ring", "--local-epochs", "1", "--quant-bits", "8", "--out", str(tmp_path / "q")])
    assert rc == 0
    quantized = json.loads((tmp_path / "q" / "metrics.jsonl").read_text())
    assert quantized["messages"] == 8 and quantized["bytes_up"] < row["bytes_up"] / 3  # 8-bit models


def test_serve_mode_gossip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request

    for argv, words in [(["--mode", "gossip"], "needs --gossip-phones"),
                        (["--topology", "ring"], "go with --mode gossip"),
                        (["--mode", "gossip", "--gossip-phones", "5", "--topology", "regular:3"], "must be even")]:
        assert main(["serve", "--port", "1", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedfleet serve: error: ") and words in err[0], err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--model", "mlp",
                             "--mode", "gossip", "--topology", "torus", "--gossip-phones", "9"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "gossip relay (torus, 9 phones)" in banner and f"127.0.0.1:{port}" in banner, banner
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/gossip/status", timeout=10) as resp:
            status = json.loads(resp.read())
        assert status == {"round": 0, "topology": "torus", "phones": 9, "rounds": {}}
    finally:
        proc.terminate()
        proc.wait(30)


def test_fleet_gossips_through_a_running_relay(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--model", "mlp",
                             "--mode", "gossip", "--topology", "ring", "--gossip-phones", "4"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None and "gossip relay" in proc.stdout.readline()
        fleet = ["fleet", "--server", url, "--gossip", "dpsgd", "--rounds", "2", "--local-epochs", "1"]
        assert main([*fleet, "--phones", "4", "--out", str(tmp_path / "a")]) == 0
        rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2] and all(r["messages"] == 8 for r in rows)
        assert rows[-1]["accuracy"] > 0.1 and rows[-1]["topology"] == "ring"
        capsys.readouterr()
        assert main([*fleet, "--phones", "4", "--sample", "0.5", "--out", str(tmp_path / "s")]) == 2
        assert "--sample is not taken with --gossip" in capsys.readouterr().err
        rc = main([*fleet, "--phones", "3", "--name-prefix", "other", "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "the server's topology joins 4 phones" in err[0], err
    finally:
        proc.terminate()
        proc.wait(30)
    capsys.readouterr()
    rc = main(["fleet", "--server", url, "--gossip", "dpsgd", "--phones", "4", "--out", str(tmp_path / "c")])
    assert rc == 2 and "cannot connect" in capsys.readouterr().err


def test_ctrl_c_ends_after_the_round_in_progress_and_writes_the_outputs(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "simulate", "--mode", "gossip", "--phones", "4",
                             "--rounds", "10000", "--model", "mlp", "--local-epochs", "1", "--out", str(tmp_path)],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.split() and line.split()[0] == "2":  # the second round's row: the run is under way
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "SIGINT: stopping after the round in progress" in err and "stopped by SIGINT" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(rows) < 10000 and [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] == "SIGINT"
