"""The command line a user types: every mistake ends with one line ``fedfleet CMD: error: ...`` and
exit status 2, before any banner and before anything is written; --help says what each flag does."""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedfleet.cli import build_parser, main
from fedfleet.device_runtime.data import load_dataset, partition
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import STORE

REPO = Path(__file__).resolve().parent.parent


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, command: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedfleet {command}: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("flags, words", [
    (["--phones", "-5"], ["--phones", "-5"]),
    (["--dataset", "synthetic:abc"], ["synthetic:abc", "whole number"]),
    (["--compute-ms", "-5", "--devices", "default"], ["--compute-ms"]),
    (["--devices", "fancy"], ["--devices", "fancy"]),
    (["--diurnal", "1.5"], ["--diurnal"]),
    (["--quantity-skew", "-1"], ["--quantity-skew"]),
    (["--quant-scale", "fit", "--quant-bits", "8"], ["--quant-rounding nearest"]),
    (["--partition", "dirichlet:abc"], ["dirichlet:abc"]),
    (["--robust", "median", "--central-clip", "1", "--central-noise-multiplier", "1"], ["central DP"]),
    (["--out", "/etc/passwd/run"], ["--out"]),
])
def test_simulate_refuses_bad_flags_before_its_banner(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      flags: list[str], words: list[str]) -> None:
    out_flags = [] if "--out" in flags else ["--out", str(tmp_path / "run")]
    rc, out, err = _run(capsys, "simulate", *out_flags, *flags)
    assert rc == 2 and out == ""  # no "fedfleet simulate: -5 phones ..." first
    _one_error_line(err, "simulate", *words)
    assert not (tmp_path / "run").exists()


def test_toml_values_of_the_wrong_type_name_the_file_and_key(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[simulate]\nphones = "four"\n')
    rc, out, err = _run(capsys, "simulate", "--config", str(bad))
    assert rc == 2 and out == ""
    _one_error_line(err, "simulate", "bad.toml", "phones", "'four'")
    bad.write_text('[simulate.server]\nover_selection = "x"\n')
    rc, _, err = _run(capsys, "simulate", "--config", str(bad))
    _one_error_line(err, "simulate", "over_selection", "'x'")
    bad.write_text('[server]\nover_selection = "x"\n')
    rc, out, err = _run(capsys, "serve", "--config", str(bad), "--port", str(_free_port()))
    assert rc == 2 and out == ""
    _one_error_line(err, "serve", "over_selection")
    bad.write_text("phones = = 3\n")
    rc, _, err = _run(capsys, "simulate", "--config", str(bad))
    _one_error_line(err, "simulate", str(bad), "not valid TOML")
    with pytest.raises(ValueError, match="over_selection must be a number"):
        ServerConfig(over_selection="x")  # type: ignore[arg-type]


def test_a_misspelt_device_column_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "devices.csv"
    trace.write_text("ms_per_sample,up_mbps,down_mbps,rtt_ms,dropuot\n5,10,40,50,0.1\n")
    rc, out, err = _run(capsys, "simulate", "--devices", str(trace), "--out", str(tmp_path / "run"))
    assert rc == 2 and out == ""
    _one_error_line(err, "simulate", "dropuot", "unknown column")


def test_serve_refuses_bad_ports_files_and_tls_before_writing(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    for port in ("99999", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--port", port])
        assert exit_info.value.code == 2
        assert "not a TCP port" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, out, err = _run(capsys, "serve", "--port", str(busy.getsockname()[1]), "--model", "mlp")
    assert rc == 2 and out == ""
    _one_error_line(err, "serve", "--port", "in use")
    port = str(_free_port())
    rc, out, err = _run(capsys, "serve", "--port", port, "--data-dir", "/etc/passwd")
    _one_error_line(err, "serve", "--data-dir /etc/passwd")
    rc, out, err = _run(capsys, "serve", "--port", port, "--bundle", str(tmp_path / "nothing"))
    _one_error_line(err, "serve", "--bundle")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    state = tmp_path / "state"
    rc, out, err = _run(capsys, "serve", "--port", port, "--data-dir", str(state), "--tls-cert", str(junk),
                        "--tls-key", str(junk))
    assert rc == 2 and out == ""  # no "listening on ..." banner
    _one_error_line(err, "serve", "--tls-cert")
    assert not state.exists()  # the task's state was not written into the data dir first


def test_fleet_and_phone_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = str(tmp_path / "run")
    rc, _, err = _run(capsys, "fleet", "--server", f"http://127.0.0.1:{_free_port()}", "--out", out_dir)
    assert rc == 2
    _one_error_line(err, "fleet", "cannot connect")
    rc, _, err = _run(capsys, "fleet", "--server", "127.0.0.1:8080", "--out", out_dir)
    _one_error_line(err, "fleet", "http://")
    rc, _, err = _run(capsys, "phone", "--server", "http://127.0.0.1:1", "--out", "/etc/passwd/x")
    _one_error_line(err, "phone", "--out")
    toml = tmp_path / "f.toml"
    toml.write_text('[fleet]\nmode = "async"\n')
    rc, _, err = _run(capsys, "fleet", "--server", "http://127.0.0.1:1", "--config", str(toml))
    _one_error_line(err, "fleet", "mode", "fedfleet serve")
    assert not Path(out_dir).exists()


@pytest.mark.parametrize("argv, words", [
    (["fleet", "--mode", "async"], ["--mode", "fedfleet serve"]),
    (["fleet", "--buffer", "3"], ["--buffer"]),
    (["fleet", "--server-optimizer", "fedadam"], ["--server-optimizer"]),
    (["fleet", "--robust", "median"], ["--robust"]),
    (["phone", "--phones", "3"], ["--phones", "fedfleet fleet"]),
    (["phone", "--name-prefix", "x"], ["--name-prefix"]),
])
def test_server_and_fleet_flags_are_refused_where_they_do_nothing(capsys: pytest.CaptureFixture[str],
                                                                 argv: list[str], words: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], "--server", "http://127.0.0.1:1", *argv[1:]])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"fedfleet {argv[0]}: error: ") and all(w in last for w in words), last


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]  # type: ignore[no-any-return]


def _listed(command: str) -> set[str]:
    """The flags ``fedfleet COMMAND --help`` lists."""
    return {o for a in _subparser(command)._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def test_help_says_what_each_subcommand_takes() -> None:
    for action in _subparser("serve")._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.dest
    assert "--mode" in _listed("serve")
    fleet = _listed("fleet")
    for flag in ("--mode", "--buffer", "--server-optimizer", "--robust", "--clip", "--server-process", "--clock"):
        assert flag not in fleet, flag
    text = _subparser("fleet").format_help()
    assert "fraction of phones per round" not in text and "probability that a phone is available" in text
    assert "default cnn" not in text and "default 10" not in text
    phone = _listed("phone")
    for flag in ("--phones", "--workers", "--attack", "--name-prefix", "--mode"):
        assert flag not in phone, flag
    assert "--shard" in phone


def test_serve_mode_flag_and_report_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5, "updates": 2}\n')
    rc, _, err = _run(capsys, "report", str(run), "--out", "/etc/passwd/report")
    assert rc == 2
    _one_error_line(err, "report", "--out /etc/passwd/report")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--mode", "async",
                             "--model", "mlp"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}" in banner and "async" in banner, banner
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--model", "mlp",
                             "--rounds", "2", "--sample", "1.0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_phone_trains_on_one_shard_and_says_which(server: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedfleet.cli", "phone", "--server", server, "--name", "solo",
                           "--shard", "3/10", "--partition", "dirichlet:0.5", "--seed", "4", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = load_dataset("digits", seed=4)
    shard = partition(data.y_train, 10, "dirichlet:0.5", np.random.default_rng(4))[3]
    assert f"shard 3 of 10 of digits ({len(shard)} of {len(data.y_train)} examples" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "devices.csv").open()))
    assert [(r["phone"], int(r["examples"])) for r in rows] == [("solo", len(shard))]
    assert int(rows[0]["participations"]) >= 1 and time.perf_counter() - started < 300
    again = subprocess.run([sys.executable, "-m", "fedfleet.cli", "phone", "--server", server, "--name", "solo",
                            "--shard", "3/10", "--out", str(tmp_path / "again")], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2
    _one_error_line(again.stderr, "phone", "solo", "--name")  # its name is taken: one line, no traceback


def test_a_dataset_folder_without_its_files_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "cifar"
    empty.mkdir()
    rc, _, err = _run(capsys, "serve", "--port", str(_free_port()), "--dataset", f"cifar10:{empty}")
    assert rc == 2
    _one_error_line(err, "serve", f"cifar10:{empty}", "CIFAR10", "download=True")
    rc, _, err = _run(capsys, "simulate", "--dataset", f"cifar10:{empty}", "--out", str(tmp_path / "run"))
    assert rc == 2
    _one_error_line(err, "simulate", f"cifar10:{empty}")
    for dataset in (f"cifar10:{empty}", "bogus"):  # export checks what it is given too
        rc, _, err = _run(capsys, "export", "--model", "mlp", "--dataset", dataset, "--out", str(tmp_path / "b"))
        assert rc == 2
        _one_error_line(err, "export", dataset)


def test_a_damaged_state_database_is_one_line_and_left_as_it_was(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    junk = np.random.default_rng(0).bytes(8192)  # not SQLite at all
    (state / "server.sqlite").write_bytes(junk)
    rc, out, err = _run(capsys, "serve", "--port", str(_free_port()), "--model", "mlp", "--data-dir", str(state))
    assert rc == 2 and "listening" not in out
    _one_error_line(err, "serve", f"--data-dir {state}: server.sqlite", "not a fedfleet state database")
    assert (state / "server.sqlite").read_bytes() == junk
    # A real state whose pages past the header are damaged: found while the server reads it back.
    real = tmp_path / "real"
    store = make_app(ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, data_dir=str(real)))[STORE]
    store.close()
    damaged = bytearray((real / "server.sqlite").read_bytes())
    damaged[4096:] = np.random.default_rng(1).bytes(len(damaged) - 4096)
    (real / "server.sqlite").write_bytes(damaged)
    rc, out, err = _run(capsys, "serve", "--port", str(_free_port()), "--model", "mlp", "--data-dir", str(real))
    assert rc == 2 and "listening" not in out
    _one_error_line(err, "serve", f"--data-dir {real}: server.sqlite", "damaged")
    assert (real / "server.sqlite").read_bytes() == damaged


def test_a_data_dir_of_another_task_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    make_app(ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, data_dir=str(tmp_path)))[STORE].close()
    rc, out, err = _run(capsys, "serve", "--port", str(_free_port()), "--model", "cnn", "--data-dir", str(tmp_path))
    assert rc == 2 and "listening" not in out
    _one_error_line(err, "serve", str(tmp_path), "different task")


def test_flags_are_never_taken_for_a_longer_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (["simulate", "--phone", "3"], ["serve", "--data", str(tmp_path)],
                 ["fleet", "--server", "http://127.0.0.1:1", "--phone", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err, argv
    assert "registers as NAME (" in _subparser("phone").format_help()


def test_a_fault_of_ours_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A ValueError from inside the run (here injected into it) is not the user's: it propagates."""
    import fedfleet.simulate

    def fault(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(fedfleet.simulate, "run", fault)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["simulate", "--phones", "2", "--out", str(tmp_path / "run")])


@pytest.mark.slow
def test_serve_says_when_its_rounds_are_done_and_keeps_serving(tmp_path: Path) -> None:
    import select
    import urllib.request

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--model", "mlp",
                               "--rounds", "1", "--sample", "1.0"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        phone = subprocess.run([sys.executable, "-m", "fedfleet.cli", "phone", "--server", f"http://127.0.0.1:{port}",
                                "--out", str(tmp_path / "phone")], cwd=REPO, capture_output=True, text=True,
                               timeout=300)
        assert phone.returncode == 0, phone.stderr
        assert select.select([server.stdout], [], [], 30)[0], "no line after the last round"
        line = server.stdout.readline()
        assert line.startswith("fedfleet server: 1 rounds done, accuracy ") and "still serving" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/rounds") as resp:
            assert json.load(resp)["finished"] is True  # it does keep serving
    finally:
        server.terminate()
        server.wait(30)


def test_workers_take_a_count_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    """--workers N|auto (TOML and the Python API too): auto is the cores this process may use, resolved
    before anything starts; anything else is one line."""
    from fedfleet.simulate_config import SimulateConfig

    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit) as exit_:
            main(["simulate", "--workers", bad])
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and out == ""
        assert err.strip().splitlines()[-1].startswith("fedfleet simulate: error: argument --workers: give a number")
    assert SimulateConfig(workers="auto").workers == len(os.sched_getaffinity(0))
    assert SimulateConfig(settings={"workers": "auto"}).workers == len(os.sched_getaffinity(0))
    assert build_parser().parse_args(["simulate", "--workers", "auto"]).workers == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="workers"):
        SimulateConfig(workers="many")
