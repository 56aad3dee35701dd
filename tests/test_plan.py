"""The training plan and an update's meta are defined once, in protocol/, and checked there: the
server's config when it is made, the admin plan endpoint, the phones' TrainConfig and the upload
handler all say yes and no to the same values, with the same words."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedfleet.cli import main
from fedfleet.device_runtime.runtimes import TrainConfig
from fedfleet.protocol.meta import BadUpdateMeta, check_update_meta
from fedfleet.protocol.plan import MAX_BATCH_SIZE, MAX_LOCAL_EPOCHS, InvalidPlan, TrainPlan
from fedfleet.server.config import ServerConfig
from fedfleet.simulate_config import SimulateConfig
from tests.conftest import MakeClient, register, update_body

REPO = Path(__file__).resolve().parent.parent
ADMIN = {"Authorization": "Bearer s3cret"}
VALUES: list[tuple[str, Any]] = [
    ("batch_size", 0), ("batch_size", 1), ("batch_size", MAX_BATCH_SIZE), ("batch_size", MAX_BATCH_SIZE + 1),
    ("local_epochs", 0), ("local_epochs", MAX_LOCAL_EPOCHS), ("local_epochs", MAX_LOCAL_EPOCHS + 1),
    ("lr", 0.0), ("lr", -0.1), ("lr", 1e-6), ("lr", math.inf), ("prox_mu", -1.0), ("prox_mu", 0.0),
    ("prox_mu", 0.5), ("prox_mu", math.nan),
]


def _accepts(make: Any, name: str, value: Any) -> str | None:
    """None when ``make(name=value)`` succeeds, else its error's message."""
    try:
        make(**{name: value})
    except ValueError as exc:
        return str(exc)
    return None


def test_one_set_of_defaults_for_the_server_the_simulation_and_the_phone() -> None:
    plan = {k: v for k, v in ServerConfig().train_plan().items() if k != "codec"}
    assert plan == TrainPlan().to_dict() == TrainConfig().to_dict()
    sim = SimulateConfig()
    assert plan == {k: getattr(sim, k) for k in plan}


@pytest.mark.parametrize("name, value", VALUES)
def test_the_server_config_refuses_what_a_phone_refuses(name: str, value: Any) -> None:
    phone = _accepts(TrainConfig, name, value)
    server = _accepts(lambda **kw: ServerConfig(model="mlp", **kw), name, value)
    assert (phone is None) == (server is None), (phone, server)
    if phone is not None:
        assert server == phone and server.startswith(f"{name} must be ")


async def test_the_admin_plan_endpoint_checks_with_the_same_function(make_server: MakeClient) -> None:
    client = await make_server(admin_token="s3cret")
    for name, value in VALUES:
        if isinstance(value, float) and not math.isfinite(value):
            continue  # JSON has no NaN or infinity (the endpoint's own test sends them raw)
        resp = await client.post("/v1/admin/plan", json={name: value}, headers=ADMIN)
        body = await resp.json()
        try:
            TrainPlan(**{name: value})
        except InvalidPlan as exc:
            assert (resp.status, body["error"], body["message"]) == (400, "bad_plan", str(exc)), (name, value)
        else:
            assert resp.status == 200 and body["train"][name] == value, (name, value, body)


def test_simulate_refuses_a_server_plan_phones_would_refuse(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    conf = tmp_path / "sim.toml"
    conf.write_text("[simulate.server]\nbatch_size = 0\n")
    rc = main(["simulate", "--config", str(conf), "--out", str(tmp_path / "run"), "--phones", "2", "--rounds", "1"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err  # before the banner, before any server
    assert lines[0].startswith("fedfleet simulate: error: ") and "batch_size must be a whole number" in lines[0]
    assert not (tmp_path / "run").exists()


def test_serve_refuses_a_plan_phones_would_refuse_before_it_listens(tmp_path: Path) -> None:
    conf = tmp_path / "serve.toml"
    conf.write_text("[server]\nprox_mu = -1.0\n")
    proc = subprocess.run([sys.executable, "-m", "fedfleet.cli", "serve", "--config", str(conf), "--port", "8089",
                           "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == "fedfleet serve: error: prox_mu must be a finite number >= 0, got -1.0"
    assert not (tmp_path / "d").exists()


BAD_META: list[dict[str, Any]] = [
    {"train_loss": True}, {"train_loss": "low"}, {"num_examples": 0}, {"num_examples": 11},
    {"num_examples": 2.0}, {"base_version": -1}, {"round": True}, {"update_id": ""},
]


@pytest.mark.parametrize("meta", BAD_META, ids=lambda m: ",".join(f"{k}={v!r}" for k, v in m.items()))
async def test_the_upload_handler_checks_meta_with_the_protocols_function(make_server: MakeClient,
                                                                          meta: dict[str, Any]) -> None:
    client = await make_server(max_examples=10)
    _, auth, task = await register(client, "p")
    assert (await (await client.post("/v1/checkin", headers=auth)).json())["action"] == "train"
    full = {"update_id": "u1", "base_version": 0, "num_examples": 10, "train_loss": 1.0, "round": 1, **meta}
    with pytest.raises(BadUpdateMeta) as expected:
        check_update_meta(full, max_examples=10)
    resp = await client.post("/v1/update", data=update_body(task, **meta), headers=auth)
    body = await resp.json()
    assert (resp.status, body["error"], body["message"]) == (400, expected.value.reason, str(expected.value))
    status = await (await client.get("/v1/status")).json()
    assert status["updates_in_round"] == 0  # nothing accepted


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", str(MAX_BATCH_SIZE + 1)], f"batch_size (--batch-size) must be a whole number from 1 to {MAX_BATCH_SIZE}"),
    (["--local-epochs", "0"], f"local_epochs (--local-epochs) must be a whole number from 1 to {MAX_LOCAL_EPOCHS}"),
    (["--prox-mu", "-0.5"], "prox_mu (--prox-mu) must be a finite number >= 0, got -0.5"),
])
def test_simulate_names_the_flag_of_a_plan_value_out_of_the_protocols_limits(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], words: str) -> None:
    rc = main(["simulate", "--out", str(tmp_path / "run"), *flags])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith(f"fedfleet simulate: error: {words}"), err
    assert not (tmp_path / "run").exists()
