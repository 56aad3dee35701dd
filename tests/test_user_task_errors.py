"""A user's task given wrong: one line naming the flag and what is wrong, exit 2, before any server starts
(nothing written); and a phone whose model differs from the server's is refused at registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedfleet.cli import main
from fedfleet.export.task_model import model_fingerprint, task_model
from tests.conftest import MakeClient
from tests.test_cli_errors import REPO, _free_port, _one_error_line

BAD_TASK = '''
import numpy as np
import torch

NOT_CALLABLE = 3

def a_string():
    return "not a model"

def raises():
    raise RuntimeError("my factory is broken")

def wrong_width():  # logits of 3 classes for a 10-class dataset
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))

def _data(n=100, f=4):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, f)).astype(np.float32), rng.integers(0, 3, n)

def lengths():
    x, y = _data()
    return x, y[:-1], x, y

def nan():
    x, y = _data()
    x[5, 2] = np.nan
    return x, y, x, y

def labels():
    x, y = _data()
    return x, y, x, y, 2  # num_classes 2, labels up to 2

def empty_test():
    x, y = _data()
    return x, y, x[:0], y[:0]

def flat_x():
    x, y = _data()
    return x[:, 0], y, x, y

def a_dict():
    return {"x": 1}
'''


@pytest.fixture
def bad_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "bad_task_module.py").write_text(textwrap.dedent(BAD_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_task_module"


def _refused(capsys: pytest.CaptureFixture[str], out: Path, *flags: str) -> str:
    rc = main(["simulate", "--out", str(out), "--phones", "2", "--rounds", "1", *flags])
    stdout, err = capsys.readouterr()
    assert rc == 2 and stdout == "", (rc, stdout, err)  # not even the banner
    assert not out.exists()  # no server started: nothing written
    return err


@pytest.mark.parametrize("flags, words", [
    (["--model", "no_such_module_xyz:make"], ["--model no_such_module_xyz:make", "cannot import"]),
    (["--model", "{m}:missing"], ["--model", "no attribute 'missing'"]),
    (["--model", "{m}:NOT_CALLABLE"], ["--model", "not a callable"]),
    (["--model", "{m}:a_string"], ["--model", "returned a str, not a torch.nn.Module"]),
    (["--model", "{m}:raises"], ["--model", "my factory is broken"]),
    (["--model", "{m}:wrong_width"], ["--model", "returns [2, 3]", "10 classes"]),
    (["--model", "not a spec"], ["--model", "unknown model"]),
    (["--model", "cnn", "--dataset", "examples.custom_task:digit_rows"], ["--model cnn", "images [C, H, W]"]),
    (["--dataset", "{m}:lengths", "--model", "mlp"], ["--dataset", "x_train has 100 examples", "y_train"]),
    (["--dataset", "{m}:nan", "--model", "mlp"], ["--dataset", "x_train holds NaN"]),
    (["--dataset", "{m}:labels", "--model", "mlp"], ["--dataset", "labels must be in [0, 2)"]),
    (["--dataset", "{m}:empty_test", "--model", "mlp"], ["--dataset", "test split is empty"]),
    (["--dataset", "{m}:a_dict", "--model", "mlp"], ["--dataset", "returned a dict"]),
    (["--dataset", "{m}:flat_x", "--model", "mlp"], ["--dataset", "x_train has shape [100]", "[N, F]"]),
    (["--dataset", "{m}:NOT_CALLABLE"], ["--dataset", "not a callable"]),
    (["--dataset", "npz:/no/such.npz"], ["--dataset npz:/no/such.npz", "no such file"]),
    (["--dataset", "imagefolder:/no/such/folder"], ["--dataset imagefolder:/no/such/folder", "no such folder"]),
])
def test_a_bad_task_is_one_line_before_any_server(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  bad_task: str, flags: list[str], words: list[str]) -> None:
    err = _refused(capsys, tmp_path / "run", *[f.format(m=bad_task) for f in flags])
    _one_error_line(err, "simulate", *words)


def test_an_image_folder_with_an_unreadable_image_is_named(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    from examples.imagefolder_digits import write_digit_pngs

    folder = write_digit_pngs(tmp_path / "png", per_class=3)
    (folder / "4" / "broken.png").write_bytes(b"not a png")
    err = _refused(capsys, tmp_path / "run", "--dataset", f"imagefolder:{folder}", "--model", "cnn")
    _one_error_line(err, "simulate", f"--dataset imagefolder:{folder}", "cannot read an image")
    (folder / "4" / "broken.png").unlink()
    (folder / "empty").mkdir()  # a class folder without images
    err = _refused(capsys, tmp_path / "run", "--dataset", f"imagefolder:{folder}", "--model", "cnn")
    _one_error_line(err, "simulate", f"--dataset imagefolder:{folder}", "empty")


def test_npz_keys_are_named_when_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4))
    err = _refused(capsys, tmp_path / "run", "--dataset", f"npz:{tmp_path / 'd.npz'}")
    _one_error_line(err, "simulate", "missing arrays x_test, y_test")


def test_weights_that_do_not_fit_the_model_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cnn = task_model("cnn", (1, 8, 8), 10)
    save_file(cnn.state_dict(), str(tmp_path / "cnn.safetensors"))
    err = _refused(capsys, tmp_path / "run", "--model", "mlp", "--init-weights", str(tmp_path / "cnn.safetensors"))
    _one_error_line(err, "simulate", "--init-weights", "do not fit", "fc1.weight missing")
    mlp = task_model("mlp", (1, 8, 8), 10).state_dict()
    mlp["fc2.weight"] = torch.zeros(10, 7)
    torch.save(mlp, tmp_path / "mlp.pt")
    err = _refused(capsys, tmp_path / "run", "--model", "mlp", "--init-weights", str(tmp_path / "mlp.pt"))
    _one_error_line(err, "simulate", "--init-weights", "fc2.weight has shape [10, 7], the model's is [10, 32]")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a module: weights_only refuses it
    err = _refused(capsys, tmp_path / "run", "--model", "mlp", "--init-weights", str(tmp_path / "pickled.pt"))
    _one_error_line(err, "simulate", "--init-weights", "weights_only=True")


def test_init_weights_start_the_global_model(tmp_path: Path) -> None:
    """Version 0, what phones are first given, is the user's weights (drawn here from another seed), not
    the weights of the server's --seed."""
    from safetensors.torch import save_file

    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig
    from fedfleet.server.state import COORD

    weights = task_model("mlp", (1, 8, 8), 10, seed=7).state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    app = make_app(ServerConfig(model="mlp", init_weights=str(tmp_path / "w.safetensors")))
    for name, value in app[COORD].params.items():
        np.testing.assert_array_equal(value, weights[name].numpy())


async def test_a_phone_with_another_model_is_refused_at_registration(make_server: MakeClient) -> None:
    client = await make_server(model="mlp")
    task = await (await client.get("/v1/task")).json()
    mlp = model_fingerprint(task_model("mlp", (1, 8, 8), 10))
    assert task["model_fingerprint"] == mlp
    other = model_fingerprint(task_model("mlp", (1, 8, 8), 7))  # same names, another head shape
    resp = await client.post("/v1/register", json={"name": "p1", "model_fingerprint": other})
    body: dict[str, Any] = await resp.json()
    assert resp.status == 409 and body["error"] == "model_mismatch", body
    resp = await client.post("/v1/register", json={"name": "p1", "model_fingerprint": 5})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_fingerprint"
    resp = await client.post("/v1/register", json={"name": "p1", "model_fingerprint": mlp})
    assert resp.status == 201  # the refused attempts enrolled nothing: the name is still free


@pytest.fixture
def mlp_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--model", "mlp",
                             "--rounds", "1"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_phone_command_says_in_one_line_that_its_model_is_refused(mlp_server: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedfleet.cli", "phone", "--server", mlp_server, "--model", "cnn",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "phone", "model_mismatch", "differs from the task's")


def test_export_refuses_weights_that_do_not_fit_and_a_run_without_them(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(task_model("cnn", (1, 8, 8), 10).state_dict(), str(tmp_path / "cnn.safetensors"))
    rc = main(["export", "--model", "mlp", "--dataset", "digits", "--weights", str(tmp_path / "cnn.safetensors"),
               "--out", str(tmp_path / "bundle")])
    _, err = capsys.readouterr()
    assert rc == 2 and not (tmp_path / "bundle").exists()
    _one_error_line(err, "export", "--weights", "do not fit")
    rc = main(["export", "--from-run", str(tmp_path), "--out", str(tmp_path / "bundle")])
    _, err = capsys.readouterr()
    assert rc == 2
    _one_error_line(err, "export", "--from-run", "no final_weights.safetensors")
