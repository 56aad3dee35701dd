"""Java phones (android_demo/fedclient) next to Python phones, against the real server.

Each run starts ``fedfleet serve`` on a free loopback port in a subprocess, three Java phones
(``org.fedfleet.client.Main``, trained by the plain-Java MLP trainer on bundled digits) and a
Python fleet of three (``fedfleet fleet``), and checks the server's own records: every round
merged all six phones, nothing was rejected, accuracy rose, and the bytes the phones say they
sent are the bytes the round records count. Phones ask for the model inside the check-in's
answer (protocol/FORMAT.md section 9), so a task costs no GET /v1/model; in the codec run one
Java phone does not ask and downloads every model instead. Phones also ask for their next
check-in with each upload (same section), which the server holds as a long poll until the next
round opens: in the first run every phone does, and after its first check-in a task costs one
request; in the codec run only the Java phone without inline models does (as JSON), the others
are switched off and check in on their own, as before. The codec run has every phone clip,
add Gaussian noise, keep the top 10% with error feedback and quantize to 8 bits, so the Python
server decodes and merges the Java encoder's sparse messages, and both sides agree on epsilon.

Also runs the JUnit suite (golden vectors, codec, client), so ``make test`` covers it. Skips only
when there is no ``javac``; a missing junit5 or libandroid-json-java package is a failure.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import request_counts
from tests.fedclient_build import JavaBuild

REPO = Path(__file__).resolve().parents[1]
JAVA_PHONES = 3
PY_PHONES = 3
ROUNDS = 3
CODEC = ('{clip = 1.0, noise = "gaussian", noise_multiplier = 0.3, sparsify = "topk", density = 0.1, '
         "quant_bits = 8, error_feedback = true}")

pytestmark = pytest.mark.skipif(shutil.which("javac") is None, reason="javac not found: the Java client needs JDK 17+")


@pytest.fixture(scope="module")
def classpath(fedclient: JavaBuild) -> str:
    assert fedclient.jar_built, fedclient.stderr + fedclient.stdout
    return fedclient.classpath


@pytest.mark.slow
def test_junit_suite(fedclient: JavaBuild) -> None:
    """The JUnit run of the session's build (tests/fedclient_build.py: `build.sh test`)."""
    assert fedclient.returncode == 0, fedclient.stdout[-4000:] + fedclient.stderr[-4000:]
    assert " 0 tests failed" in fedclient.stdout and " tests successful" in fedclient.stdout, fedclient.stdout[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _requests(url: str) -> dict[str, int]:
    """Requests the server answered by "METHOD endpoint", from its /metrics counters."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return request_counts(resp.read().decode())


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"fedfleet serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            _get(url + "/v1/status")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"fedfleet serve did not answer within {timeout} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_mixed(tmp: Path, classpath: str, codec: str | None, plain_java: int = 0, chain: bool = True,
              server_toml: str = "") -> dict[str, Any]:
    """Server + Java phones + Python fleet; returns the server's records, both sides' stats and the
    server's request counts. The first ``plain_java`` Java phones do not ask for inline models
    (``--inline-model no``); without ``chain`` only those ask for their next check-in with their
    upload (``--chain-checkin no`` for the other Java phones and the Python fleet)."""
    toml = tmp / "server.toml"
    # min_cohort = all six phones: each round waits for every phone, so each one trains every round.
    # A check-in finding no work is held (long poll, below the Java client's 60 s read timeout), so a
    # check-in made with an upload waits there for the next round's task instead of answering "wait".
    toml.write_text("[server]\nmin_cohort = 6\nsample_fraction = 1.0\nround_timeout_s = 120\ncheckin_hold_s = 30\n"
                    + (f"codec = {codec}\n" if codec else "") + server_toml)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedfleet.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(tmp / "data"), "--model", "mlp", "--dataset", "digits", "--rounds", str(ROUNDS),
             "--config", str(toml)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    java: list[subprocess.Popen[str]] = []
    try:
        _wait_ready(url, server, log)
        java = [subprocess.Popen(["java", "-cp", classpath, "org.fedfleet.client.Main", "--server", url,
                                  "--name", f"java-{i}", "--shard", f"{i}/{JAVA_PHONES}", "--seed", str(i),
                                  "--inline-model", "no" if i < plain_java else "yes",
                                  "--chain-checkin", "yes" if chain or i < plain_java else "no"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(JAVA_PHONES)]
        fleet = subprocess.run(
            [sys.executable, "-m", "fedfleet.cli", "fleet", "--server", url, "--phones", str(PY_PHONES),
             "--name-prefix", "py", "--rounds", str(ROUNDS), "--seed", "1", "--workers", "1", "--out", str(tmp / "run"),
             "--chain-checkin", "yes" if chain else "no"],
            capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
        assert fleet.returncode == 0, fleet.stderr[-4000:] + log.read_text()[-4000:]
        summaries = []
        for proc in java:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"Java phone failed: {stderr}\n{log.read_text()[-4000:]}"
            summaries.append(json.loads(stdout.strip().splitlines()[-1]))
        rounds = _get(url + "/v1/rounds")
        status = _get(url + "/v1/status")
        requests = _requests(url)
    finally:
        for proc in java:
            _stop(proc)
        _stop(server)
    with (tmp / "run" / "devices.csv").open() as f:
        python = list(csv.DictReader(f))
    return {"rounds": rounds["rounds"], "finished": rounds["finished"], "status": status, "java": summaries,
            "python": python, "requests": requests}


def _check_merged_and_counted(run: dict[str, Any]) -> None:
    rounds, java, python = run["rounds"], run["java"], run["python"]
    assert run["finished"] and [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["updates"] == JAVA_PHONES + PY_PHONES and r["rejected"] == 0 for r in rounds), rounds
    assert run["status"]["rejections"] == {} and run["status"]["done"]
    for s in java:  # every Java phone's update was accepted and merged in every round
        assert (s["participations"], s["rejected"], s["refused"], s["errors"]) == (ROUNDS, 0, 0, 0), s
    assert all(int(p["participations"]) == ROUNDS and int(p["rejected"]) == 0 for p in python), python
    # The round records count every phone request body from the start until the last merge; only
    # the final check-ins that got "done" ('{"inline_model": true}', 22 bytes at most) fall outside
    # them. So the bytes the phones say they sent, Java's included, are the bytes in the metrics.
    phones_up = sum(s["bytes_up"] for s in java) + sum(int(p["bytes_up"]) for p in python)
    recorded_up = sum(r["bytes_up"] for r in rounds)
    assert 0 <= phones_up - recorded_up <= 2 * 22 * (JAVA_PHONES + PY_PHONES), (phones_up, recorded_up)
    java_up = sum(s["bytes_up"] for s in java)
    assert sum(r["update_bytes"] for r in rounds) > java_up / 2  # Java's uploads are in update_bytes too


@pytest.mark.slow
def test_java_and_python_phones_train_one_model(tmp_path: Path, classpath: str) -> None:
    run = run_mixed(tmp_path, classpath, codec=None)
    _check_merged_and_counted(run)
    # every Java phone took each task's model inside the check-in's answer; nobody downloaded one
    assert [(s["inline_models"], s["model_downloads"]) for s in run["java"]] == [(ROUNDS, 0)] * JAVA_PHONES
    assert run["requests"].get("GET /v1/model", 0) == 0
    # Every upload brought the phone's next check-in (the next round's task, held until the round
    # opened, or "done"): after its first check-in, a phone needed no other (a few more when a
    # held check-in outlasted the hold while the Python fleet was starting).
    for s in run["java"]:
        assert s["chained_checkins"] == ROUNDS and s["checkins"] >= ROUNDS + 1, s
    posts = {k: v for k, v in run["requests"].items() if k in ("POST /v1/checkin", "POST /v1/update")}
    print("requests, every phone chained:", posts, "Java phones' own check-ins:",
          [s["checkins"] - s["chained_checkins"] for s in run["java"]])
    assert posts["POST /v1/update"] == ROUNDS * (JAVA_PHONES + PY_PHONES)
    assert posts["POST /v1/checkin"] <= posts["POST /v1/update"] // 2, posts
    accs = [r["accuracy"] for r in run["rounds"]]
    assert accs[0] > 0.5 and accs[-1] > 0.85 and accs[-1] >= accs[0], accs  # chance is 0.1
    for s in run["java"]:
        assert s["epsilon"] == 0 and s["last_version"] == ROUNDS - 1 and 0 < s["train_loss"] < 2.3, s


@pytest.mark.slow
def test_server_merges_java_encoded_compressed_noised_updates(tmp_path: Path, classpath: str) -> None:
    run = run_mixed(tmp_path, classpath, codec=CODEC, plain_java=1, chain=False)
    _check_merged_and_counted(run)
    # java-0 did not ask for inline models: it downloaded each task's model, the others never did
    assert [(s["inline_models"], s["model_downloads"]) for s in run["java"]] == (
        [(0, ROUNDS)] + [(ROUNDS, 0)] * (JAVA_PHONES - 1))
    assert run["requests"]["GET /v1/model"] == ROUNDS
    # java-0 asked for its next check-in with each upload (as JSON: its tasks still downloaded their
    # models); the others were switched off: every task, and the final "done", took a check-in
    java0, *others = run["java"]
    assert java0["chained_checkins"] == ROUNDS, java0
    assert all(s["chained_checkins"] == 0 and s["checkins"] >= ROUNDS + 1 for s in others), others
    unchained = len(others) + PY_PHONES
    assert run["requests"]["POST /v1/checkin"] >= unchained * (ROUNDS + 1) + 1, run["requests"]
    rounds = run["rounds"]
    accs = [r["accuracy"] for r in rounds]
    assert accs[-1] > accs[0] and accs[-1] > 0.2, accs  # noisy (z = 0.3 on every phone), but it learns
    # top-10% of 2,410 values at 8 bits with varint indices: several times smaller than dense float32
    assert all(r["compression_ratio"] > 4 for r in rounds), [r["compression_ratio"] for r in rounds]
    # Every phone was charged one Gaussian release per round, on both sides of the wire: the Java
    # phone's own accountant agrees with the server's ledger (dp_accounting) on epsilon.
    assert rounds[-1]["noise_multiplier"] == 0.3
    for s in run["java"]:
        assert s["epsilon"] == pytest.approx(rounds[-1]["epsilon_max"], rel=1e-9), (s, rounds[-1])
