"""fedfleet from Python: ``import fedfleet`` is light, its names are the documented ones, and a run takes the
user's objects (a module-level model factory, arrays in memory) as the command line takes specs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedfleet
from examples import custom_task
from examples.imagefolder_digits import main as imagefolder_example
from tests.test_cli_errors import REPO


def test_import_fedfleet_loads_no_torch_and_exports_what_it_documents() -> None:
    code = ("import sys, fedfleet\n"
            "print(sorted(m for m in ('torch', 'aiohttp', 'sklearn') if m in sys.modules))\n"
            "fedfleet.SimulateConfig, fedfleet.make_dataset\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split("\n")[:2] == ["[]", "False"]
    for name in fedfleet.__all__:
        assert getattr(fedfleet, name).__doc__, name  # each documented
    assert "run_simulation" in dir(fedfleet)
    with pytest.raises(AttributeError):
        fedfleet.no_such_name  # noqa: B018


def test_run_simulation_takes_a_factory_and_arrays(tmp_path: Path) -> None:
    x, y, xt, yt = custom_task.digit_rows(seed=1)
    data = fedfleet.make_dataset(x, y, xt, yt, name="rows")
    state = torch.random.get_rng_state()
    summary = fedfleet.run_simulation(model=custom_task.conv1d, dataset=data, phones=4, rounds=3, sample=1.0,
                                      local_epochs=2, batch_size=16, lr=0.3, out=str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), state)  # the model's seeded init left torch's RNG alone
    assert summary["config"]["model"] == "examples.custom_task:conv1d" and summary["config"]["dataset"] == "arrays:rows"
    assert summary["final_accuracy"] > 0.8
    model = fedfleet.load_trained_model(tmp_path)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-9)


@pytest.mark.parametrize("model", ["mlp", "cnn", "examples.custom_task:bn_cnn"])
def test_building_a_model_leaves_torchs_global_generator_alone(model: str) -> None:
    state = torch.random.get_rng_state()
    fedfleet.task_model(model, (1, 8, 8), 10, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_same_seed_builds_the_same_user_model() -> None:
    a = fedfleet.task_model("examples.custom_task:gru", (8, 8), 10, seed=3).state_dict()
    b = fedfleet.task_model("examples.custom_task:gru", (8, 8), 10, seed=3).state_dict()
    c = fedfleet.task_model("examples.custom_task:gru", (8, 8), 10, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_only_importable_callables_and_checked_arrays_are_taken() -> None:
    with pytest.raises(ValueError, match="module-level"):
        fedfleet.ref_of(lambda: None, "model")
    assert fedfleet.ref_of(custom_task.bn_cnn, "model") == "examples.custom_task:bn_cnn"
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="labels must be in"):
        fedfleet.make_dataset(x, np.array([0, 1, 2, 3, -1]), x, np.zeros(5, int))


def test_the_image_folder_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert imagefolder_example([str(tmp_path / "png"), str(tmp_path / "run")]) == 0
    assert len(list((tmp_path / "png" / "3").glob("*.png"))) == 60
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("final accuracy") and float(line.split()[2].rstrip(";")) > 0.5, line
    assert (tmp_path / "run" / "final_weights.safetensors").is_file()
