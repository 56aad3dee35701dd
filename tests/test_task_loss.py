"""A task's own loss and metrics (``--loss``/``--metrics MODULE:ATTR``, export/task_loss.py).

Oracles: a hand-written float64 SGD loop with the loss written out (label smoothing), against which
the batched (vmapped) trainer and the eager per-phone trainer must agree; the final weights' loss and
metrics on the test split computed directly, against what the server recorded; eager PyTorch against
the exported ExecuTorch program and ONNX train step (real runtimes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from examples import custom_task
from fedfleet.cli import main
from fedfleet.device_runtime.batched import train_many
from fedfleet.device_runtime.runtimes.base import TrainConfig, iterate_batches
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.task_model import model_fingerprint, task_model
from tests.conftest import MakeClient
from tests.test_batched import assert_same, make_jobs, per_phone
from tests.test_cli_errors import REPO, _free_port, _one_error_line

SMOOTHING = 0.1
HERE = "tests.test_task_loss"


# --- losses and metrics of this module, named by MODULE:ATTR below -------------------------------------

def item_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy scaled by a number read out of the tensor: neither vmap nor export can trace it."""
    scale = 1.0 if float(outputs.detach().abs().sum()) >= 0 else 2.0
    return nn.functional.cross_entropy(outputs, targets) * scale


def per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def nan_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.sum() * float("nan")


def a_float(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return 0.5


def constant(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0)


def int_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) != targets).sum()


def string_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    return {"f1": "high"}


def list_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return [0.5]


def reserved_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    return {"accuracy": 0.5}


NOT_CALLABLE = 3


def ten_outputs() -> nn.Module:
    return nn.Linear(10, 10)


def smoothed_oracle(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Label smoothing written out: (1 - e) * NLL of the label + e * mean over classes of -log p."""
    log_p = torch.log_softmax(logits, dim=1)
    nll = -log_p[torch.arange(len(y)), y]
    return ((1 - SMOOTHING) * nll - SMOOTHING * log_p.mean(dim=1)).mean()


# --- training ---------------------------------------------------------------------------------------

def oracle_sgd(model: nn.Module, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
               rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    """Plain float64 SGD with FedProx on the oracle loss, over the batches every runtime draws."""
    w = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in params.items()}
    start = {n: t.detach().clone() for n, t in w.items()}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    total, steps = 0.0, 0
    for idx in iterate_batches(len(x), cfg, rng):
        loss = smoothed_oracle(functional_call(model, w, (xt[idx],)), yt[idx])
        total += float(loss.detach())
        prox = 0.5 * cfg.prox_mu * sum(((w[n] - start[n]) ** 2).sum() for n in w)
        grads = torch.autograd.grad(loss + prox, list(w.values()))
        with torch.no_grad():
            for t, g in zip(w.values(), grads, strict=True):
                t -= cfg.lr * g
        steps += 1
    return {n: (t.detach() - start[n]).numpy() for n, t in w.items()}, total / max(steps, 1)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_batched_per_phone_and_the_oracle_train_the_same_custom_loss_in_float64(digits: Any, name: str) -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=0.5)
    model = task_model(name, (1, 8, 8), 10, seed=3)
    params = TorchRuntime(model).get_params()
    model.double()
    x = digits.x_train.astype(np.float64)
    loss = custom_task.smoothed_cross_entropy
    got = train_many(model, params, make_jobs(x, digits.y_train, seed=7), cfg, chunk=3, dtype=torch.float64, loss=loss)
    runtime = TorchRuntime(model, loss=loss)
    eager = per_phone_with(runtime, params, make_jobs(x, digits.y_train, seed=7), cfg)
    assert_same(got, eager, atol=1e-12)
    for (delta, result), (xj, yj, rng) in zip(got, make_jobs(x, digits.y_train, seed=7), strict=True):
        want, mean_loss = oracle_sgd(model, params, xj, yj, cfg, rng)
        assert result.loss == pytest.approx(mean_loss, abs=1e-12)
        for n in want:
            np.testing.assert_allclose(delta[n], want[n], atol=1e-12, err_msg=n)
    # and it is not cross-entropy's training
    plain = per_phone(model, params, make_jobs(x, digits.y_train, seed=7), cfg)
    assert max(float(np.abs(a[0][n] - b[0][n]).max()) for a, b in zip(got, plain, strict=True) for n in params) > 1e-4


def per_phone_with(runtime: TorchRuntime, params: dict[str, np.ndarray], jobs: list[Any],
                   cfg: TrainConfig) -> list[Any]:
    out = []
    for x, y, rng in jobs:
        runtime.set_params(params)
        result = runtime.train(x, y, cfg, rng)
        new = runtime.get_params()
        out.append(({n: new[n] - params[n] for n in params}, result))
    return out


async def test_a_loss_vmap_cannot_batch_trains_phone_by_phone_said_once(digits: Any,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A loss reading a number out of a tensor has no batching rule: the trainer says so once and trains
    every group phone by phone with that loss (the eager result exactly)."""
    from fedfleet.device_runtime.trainer import BatchedTrainer

    model = task_model("mlp", (1, 8, 8), 10, seed=1)
    params = TorchRuntime(model).get_params()
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1)
    sizes = (20, 17, 9, 30)
    trainer = BatchedTrainer(model, quiet_s=0.001, loss=item_loss)
    try:
        with caplog.at_level(logging.WARNING, logger="fedfleet.device_runtime.trainer"):
            first = await asyncio.gather(*[trainer.submit(params, x, y, cfg, rng, key=1)
                                           for x, y, rng in make_jobs(digits.x_train, digits.y_train, 1, sizes)])
            await asyncio.gather(*[trainer.submit(params, x, y, cfg, rng, key=2)
                                   for x, y, rng in make_jobs(digits.x_train, digits.y_train, 2, sizes)])
    finally:
        trainer.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "one by one" in lines[0], lines
    assert trainer.unbatchable and trainer.group_sizes == [len(sizes), len(sizes)]
    want = per_phone_with(TorchRuntime(task_model("mlp", (1, 8, 8), 10, seed=1), loss=item_loss), params,
                          make_jobs(digits.x_train, digits.y_train, 1, sizes), cfg)
    assert_same(list(first), want, atol=0.0)
    plain = per_phone(model, params, make_jobs(digits.x_train, digits.y_train, 1, sizes), cfg)
    assert_same(list(first), plain, atol=0.0)  # item_loss is cross-entropy times 1: the same steps


# --- a run: CLI and Python API ------------------------------------------------------------------------

def _final_outputs(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import fedfleet

    model = fedfleet.load_trained_model(run)
    data = fedfleet.load_dataset("digits", seed=0)
    with torch.no_grad():
        return model(torch.from_numpy(data.x_test)), torch.from_numpy(data.y_test.astype(np.int64))


def test_simulate_trains_the_loss_and_records_the_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["simulate", "--model", "mlp", "--dataset", "digits", "--phones", "4", "--rounds", "2", "--sample",
               "1", "--loss", "examples.custom_task:focal_loss", "--metrics", "examples.custom_task:scores",
               "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(set(r["metrics"]) == {"macro_f1", "top2_accuracy"} for r in rows)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)  # classification keeps its accuracy
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"]["loss"] == "examples.custom_task:focal_loss"
    assert summary["final_metrics"] == rows[-1]["metrics"]
    # The recorded loss and metrics are the task's own, of the final model, on the whole test split.
    outputs, y = _final_outputs(out)
    assert rows[-1]["loss"] == pytest.approx(float(custom_task.focal_loss(outputs, y)), rel=1e-5)
    assert rows[-1]["loss"] != pytest.approx(float(nn.functional.cross_entropy(outputs, y)), rel=1e-3)
    for name, value in custom_task.scores(outputs, y).items():
        assert summary["final_metrics"][name] == pytest.approx(value, abs=1e-6)
    # fedfleet report shows them: the summary's final values, a column per metric in the rounds' table
    from fedfleet.report import load_run, summary_row

    row = summary_row(load_run(out))
    assert row["final macro_f1"] == summary["final_metrics"]["macro_f1"]
    assert row["training loss"] == "examples.custom_task:focal_loss"
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").read_text().count("<th>top2_accuracy</th>") == 1


def test_the_python_api_takes_the_loss_and_metrics_as_callables(tmp_path: Path) -> None:
    import fedfleet

    summary = fedfleet.run_simulation(model="mlp", dataset="digits", loss=custom_task.smoothed_cross_entropy,
                                      metrics=custom_task.scores, phones=3, rounds=1, sample=1.0,
                                      out=str(tmp_path / "api"))
    assert summary["config"]["loss"] == "examples.custom_task:smoothed_cross_entropy"
    assert summary["task"]["metrics"] == "examples.custom_task:scores"
    assert set(summary["final_metrics"]) == {"macro_f1", "top2_accuracy"}
    outputs, y = _final_outputs(tmp_path / "api")
    rows = [json.loads(line) for line in (tmp_path / "api" / "server" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] == pytest.approx(float(custom_task.smoothed_cross_entropy(outputs, y)), rel=1e-5)
    with pytest.raises(ValueError, match="loss: .* is not a module-level function"):
        fedfleet.run_simulation(model="mlp", loss=lambda o, t: o.sum(), out=str(tmp_path / "x"))


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--loss", "no_such_module_xyz:focal"], ["--loss no_such_module_xyz:focal", "cannot import"]),
    (["--loss", f"{HERE}:NOT_CALLABLE"], ["--loss", "not a callable"]),
    (["--loss", "not a spec"], ["--loss", "MODULE:ATTR"]),
    (["--loss", f"{HERE}:per_example"], ["--loss", "shape [8]", "scalar"]),
    (["--loss", f"{HERE}:nan_loss"], ["--loss", "nan", "finite"]),
    (["--loss", f"{HERE}:a_float"], ["--loss", "returned a float, not a torch.Tensor"]),
    (["--loss", f"{HERE}:constant"], ["--loss", "does not depend on the model's outputs"]),
    (["--loss", f"{HERE}:int_loss"], ["--loss", "int64", "floating point"]),
    (["--metrics", f"{HERE}:string_metrics"], ["--metrics", "metric 'f1' is a str, not a float"]),
    (["--metrics", f"{HERE}:list_metrics"], ["--metrics", "returned a list, not a dict"]),
    (["--metrics", f"{HERE}:reserved_metrics"], ["--metrics", "'accuracy' is a name the round record has"]),
    (["--metrics", "no_such_module_xyz:m"], ["--metrics no_such_module_xyz:m", "cannot import"]),
])
def test_a_bad_loss_or_metrics_is_one_line_before_any_server(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             flags: list[str], words: list[str]) -> None:
    out = tmp_path / "run"
    rc = main(["simulate", "--out", str(out), "--phones", "2", "--rounds", "1", "--model", "mlp", *flags])
    stdout, err = capsys.readouterr()
    assert rc == 2 and stdout == "", (rc, stdout, err)
    assert not out.exists()
    _one_error_line(err, "simulate", *words)


def test_serve_refuses_a_bad_loss_before_serving(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["serve", "--port", str(_free_port()), "--model", "mlp", "--loss", f"{HERE}:per_example"])
    out, err = capsys.readouterr()
    assert rc == 2 and "listening" not in out
    _one_error_line(err, "serve", "--loss", "scalar")


async def test_a_phone_training_another_loss_is_refused_at_registration(make_server: MakeClient) -> None:
    focal = "examples.custom_task:focal_loss"
    client = await make_server(model="mlp", loss=focal)
    task = await (await client.get("/v1/task")).json()
    model = task_model("mlp", (1, 8, 8), 10)
    assert task["loss"] == focal and task["model_fingerprint"] == model_fingerprint(model, focal)
    assert model_fingerprint(model, None) == model_fingerprint(model, "cross_entropy") != model_fingerprint(model, focal)
    resp = await client.post("/v1/register", json={"name": "p1", "model_fingerprint": model_fingerprint(model)})
    body = await resp.json()
    assert resp.status == 409 and body["error"] == "model_mismatch" and "loss" in body["message"], body
    resp = await client.post("/v1/register", json={"name": "p1", "model_fingerprint": model_fingerprint(model, focal)})
    assert resp.status == 201


# --- export -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def focal_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("focal") / "bundle"
    proc = subprocess.run([sys.executable, "-m", "fedfleet.cli", "export", "--model", "mlp", "--dataset", "digits",
                           "--loss", "examples.custom_task:focal_loss", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["executorch", "onnx"])
def test_an_exported_bundle_trains_the_custom_loss_as_eager(focal_bundle: Path, digits: Any, kind: str) -> None:
    from fedfleet.device_runtime.runtimes.loader import load_runtime
    from fedfleet.export.bundle import load_manifest

    reference = TorchRuntime(task_model("mlp", (1, 8, 8), 10), loss=custom_task.focal_loss)
    plain = TorchRuntime(task_model("mlp", (1, 8, 8), 10))
    runtime = load_runtime(kind, focal_bundle)
    start = reference.get_params()
    runtime.set_params(start)
    plain.set_params(start)
    x, y = digits.x_train[:155], digits.y_train[:155]
    cfg = TrainConfig(local_epochs=2, batch_size=16, lr=0.1, prox_mu=0.1)
    got, want = (r.train(x, y, cfg, np.random.default_rng(4)) for r in (runtime, reference))
    ce = plain.train(x, y, cfg, np.random.default_rng(4))
    assert got.steps == want.steps == 20
    assert got.loss == pytest.approx(want.loss, rel=1e-4) and got.loss != pytest.approx(ce.loss, rel=1e-2)
    after, expected = runtime.get_params(), reference.get_params()
    for n in expected:
        np.testing.assert_allclose(after[n], expected[n], rtol=1e-4, atol=1e-5, err_msg=n)
    manifest = load_manifest(focal_bundle)
    assert manifest.model_fingerprint == model_fingerprint(task_model("mlp", (1, 8, 8), 10),
                                                           "examples.custom_task:focal_loss")


def test_a_loss_export_cannot_trace_is_refused_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["export", "--model", "mlp", "--dataset", "digits", "--loss", f"{HERE}:item_loss",
               "--out", str(tmp_path / "bundle")])
    _, err = capsys.readouterr()
    assert rc == 2, err
    ours = [line for line in err.splitlines() if line.startswith("fedfleet export: error: ")]  # torch warns above it
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err[-2000:]
    assert "model.pte: " in ours[0] and "train_step.onnx: " in ours[0], ours
    assert ours[0].endswith(f"(training with --loss {HERE}:item_loss)"), ours
    assert list((tmp_path / "bundle").iterdir()) == []  # nothing claimed


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedfleet.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_serve_evaluates_with_the_metrics_and_fleet_phones_train_the_loss(tmp_path: Path) -> None:
    """A deployed server with the task's loss and metrics: a fleet not given the loss refuses to start in
    one line; given another loss, its phones are refused at registration; given the same, they train and
    the server records the metrics."""
    focal = "examples.custom_task:focal_loss"
    port, data_dir = _free_port(), tmp_path / "server"
    server = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--model", "mlp",
                               "--loss", focal, "--metrics", "examples.custom_task:scores", "--rounds", "1",
                               "--sample", "1", "--data-dir", str(data_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        unnamed = _cli("fleet", "--server", url, "--model", "mlp", "--phones", "2", "--out", str(tmp_path / "a"))
        assert unnamed.returncode == 2
        _one_error_line(unnamed.stderr, "fleet", f"trains with the loss {focal}", f"give --loss {focal}")
        other = _cli("phone", "--server", url, "--model", "mlp", "--loss", "examples.custom_task:smoothed_cross_entropy",
                     "--out", str(tmp_path / "b"))
        assert other.returncode == 2
        _one_error_line(other.stderr, "phone", "model_mismatch", "loss (--loss)")
        fleet = _cli("fleet", "--server", url, "--model", "mlp", "--loss", focal, "--phones", "3",
                     "--out", str(tmp_path / "fleet"))
        assert fleet.returncode == 0, fleet.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    rows = [json.loads(line) for line in (data_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and set(rows[-1]["metrics"]) == {"macro_f1", "top2_accuracy"}


async def test_a_data_dir_resumes_only_with_the_loss_it_was_started_with(make_server: MakeClient,
                                                                          tmp_path: Path) -> None:
    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig

    focal = "examples.custom_task:focal_loss"
    client = await make_server(data_dir=str(tmp_path), loss=focal)
    assert (await (await client.get("/v1/task")).json())["loss"] == focal
    await client.close()
    for other in (None, "examples.custom_task:smoothed_cross_entropy"):
        with pytest.raises(ValueError, match="different task"):
            make_app(ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, data_dir=str(tmp_path),
                                  loss=other))
    again = await make_server(data_dir=str(tmp_path), loss=focal)
    assert (await (await again.get("/v1/task")).json())["model_fingerprint"] == model_fingerprint(
        task_model("mlp", (1, 8, 8), 10), focal)


# --- a regression: float targets, examples.custom_task's diabetes with MSE and RMSE ------------------------

REGRESSION = ["--model", "mlp", "--dataset", "examples.custom_task:diabetes"]


def test_regression_targets_train_batched_as_per_phone_in_float64() -> None:
    x, y, _, _ = custom_task.diabetes(seed=0)
    assert y.dtype == np.float32 and np.any(y != np.round(y))
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.05, prox_mu=0.1)
    model = task_model("mlp", (10,), 1, seed=3)
    params = TorchRuntime(model).get_params()
    model.double()
    xd = x.astype(np.float64)
    got = train_many(model, params, make_jobs(xd, y, seed=5), cfg, chunk=3, dtype=torch.float64, loss=custom_task.mse)
    want = per_phone_with(TorchRuntime(model, loss=custom_task.mse), params, make_jobs(xd, y, seed=5), cfg)
    assert_same(got, want, atol=1e-12)
    assert max(float(np.abs(d[n]).max()) for d, _ in want for n in d) > 1e-3


def test_a_regression_runs_end_to_end_with_its_loss_and_metrics(tmp_path: Path) -> None:
    import fedfleet

    out = tmp_path / "reg"
    rc = main(["simulate", *REGRESSION, "--loss", "examples.custom_task:mse", "--metrics",
               "examples.custom_task:regression_scores", "--phones", "4", "--rounds", "3", "--sample", "1",
               "--lr", "0.05", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["accuracy"] is None for r in rows)  # no accuracy for a regression
    assert rows[-1]["loss"] < 0.9  # standardised targets: 1.0 is predicting the mean
    model = fedfleet.load_trained_model(out)
    _, _, xt, yt = custom_task.diabetes(seed=0)
    with torch.no_grad():
        outputs = model(torch.from_numpy(xt))
    target = torch.from_numpy(yt)
    assert rows[-1]["loss"] == pytest.approx(float(custom_task.mse(outputs, target)), rel=1e-5)
    scores = custom_task.regression_scores(outputs, target)
    assert rows[-1]["metrics"] == pytest.approx(scores, rel=1e-5)
    assert scores["rmse"] == pytest.approx(rows[-1]["loss"] ** 0.5, rel=1e-5)


@pytest.mark.parametrize("flags, words", [
    ([], ["--loss", "regression task", "cross-entropy takes class labels"]),
    (["--loss", "examples.custom_task:mse", "--partition", "dirichlet:0.5"], ["--partition dirichlet:0.5", "iid"]),
    (["--loss", "examples.custom_task:mse", "--runtime", "onnx"], ["--runtime onnx", "--runtime torch"]),
    (["--loss", "examples.custom_task:mse", "--attack", "labelflip", "--attack-fraction", "0.5"],
     ["--attack labelflip", "flips class labels"]),
    (["--loss", "examples.custom_task:mse", "--model", f"{HERE}:ten_outputs"],
     ["--model", "returns [2, 10]", "a regression of 1 target(s) per example must return [2, 1]"]),
])
def test_a_regression_the_run_cannot_take_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      flags: list[str], words: list[str]) -> None:
    out = tmp_path / "run"
    rc = main(["simulate", "--out", str(out), "--phones", "2", "--rounds", "1", *REGRESSION, *flags])
    stdout, err = capsys.readouterr()
    assert rc == 2 and stdout == "" and not out.exists(), (rc, stdout, err)
    _one_error_line(err, "simulate", *words)


def test_export_refuses_a_regression_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["export", *REGRESSION, "--loss", "examples.custom_task:mse", "--out", str(tmp_path / "b")])
    _, err = capsys.readouterr()
    assert rc == 2 and not (tmp_path / "b").exists()
    _one_error_line(err, "export", "--dataset examples.custom_task:diabetes", "regression", "--runtime torch")
