"""Registration with admin-issued single-use enrolment codes (server/enrolment.py), through the real
server on loopback: 403 with a named error without a valid code, a code registers one phone (also
when two registrations race for it, and after a restart on the same data dir), and an emulated
fleet registers with a file of codes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import STORE

CODES = ["alpha-0001-xyz", "bravo-0002-xyz", "charlie-0003-xyz", "delta-0004-xyz"]


def _codes_file(tmp_path: Path) -> Path:
    path = tmp_path / "codes.txt"
    path.write_text("# issued for the pilot\n" + "\n".join(CODES) + "\n\n")
    return path


def _config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, rounds=1, sample_fraction=1.0,
                        data_dir=str(tmp_path / "state"), enrolment_codes=str(_codes_file(tmp_path)))


async def _register(client: TestClient, name: str, code: str | None) -> tuple[int, dict[str, Any]]:
    body = {"name": name, **({"enrolment_code": code} if code is not None else {})}
    resp = await client.post("/v1/register", json=body)
    return resp.status, dict(await resp.json())


async def test_a_phone_needs_an_unspent_code_and_a_code_registers_one_phone(aiohttp_client: Any,
                                                                           tmp_path: Path) -> None:
    client = await aiohttp_client(make_app(_config(tmp_path)))
    for code, error in ((None, "enrolment_code_required"), ("not-issued-123", "bad_enrolment_code"),
                        (12345678, "bad_enrolment_code"), ("x" * 10_000, "bad_enrolment_code")):
        status, body = await _register(client, "p", code)  # type: ignore[arg-type]
        assert (status, body["error"]) == (403, error), body
    assert (await _register(client, "p", CODES[0]))[0] == 201
    status, body = await _register(client, "q", CODES[0])
    assert (status, body["error"]) == (403, "enrolment_code_used")
    status, body = await _register(client, "p", CODES[1])  # refused for its name: the code stays free
    assert (status, body["error"]) == (409, "name_taken")
    racing = await asyncio.gather(*(_register(client, f"r{i}", CODES[1]) for i in range(5)))
    assert sorted(status for status, _ in racing) == [201, 403, 403, 403, 403]
    assert client.server.app[STORE].phone_count() == 2


async def test_spent_codes_stay_spent_after_a_restart(aiohttp_client: Any, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    first = await aiohttp_client(make_app(cfg))
    assert (await _register(first, "a", CODES[0]))[0] == 201
    await first.close()
    again = await aiohttp_client(make_app(cfg))  # the same data dir and codes file
    status, body = await _register(again, "b", CODES[0])
    assert (status, body["error"]) == (403, "enrolment_code_used")
    assert (await _register(again, "b", CODES[2]))[0] == 201


async def test_a_fleet_registers_with_a_file_of_codes(aiohttp_client: Any, tmp_path: Path, digits: Any) -> None:
    client = await aiohttp_client(make_app(_config(tmp_path)))
    url = str(client.make_url("")).rstrip("/")
    cfg = FleetConfig(phones=4, seed=0, trainer="pool", workers=1, enrolment_codes=tuple(CODES))
    result = await run_fleet(url, digits, cfg, torch_runtime_for_task, train_overrides={"local_epochs": 1})
    assert len(result.rounds) == 1 and client.server.app[STORE].phone_count() == 4


@pytest.mark.slow
async def test_the_phone_command_registers_with_its_code(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(make_app(_config(tmp_path)))
    url = str(client.make_url("")).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedfleet.cli", "phone", "--server", url, "--name", "solo", "--rounds", "1",
        "--model", "mlp", "--out", str(tmp_path / "run"), "--enrolment-code", CODES[3],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()
    assert client.server.app[STORE].phone_ids() == ["solo"]
    status, body = await _register(client, "other", CODES[3])
    assert (status, body["error"]) == (403, "enrolment_code_used")


def test_the_cli_refuses_a_missing_or_short_codes_file_in_one_line(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only-one-code\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok-code-123\nno spaces allowed\n")
    runs = [
        ["serve", "--enrolment-codes", str(tmp_path / "missing.txt"), "--port", "9"],
        ["serve", "--enrolment-codes", str(bad), "--port", "9"],
        ["fleet", "--server", "http://127.0.0.1:9", "--phones", "3", "--enrolment-codes", str(short)],
    ]
    for args, words in zip(runs, ["missing.txt", "line 2", "1 codes for 3 phones"], strict=True):
        done = subprocess.run([sys.executable, "-m", "fedfleet.cli", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("fedfleet") and "error:" in line and words in line, line
