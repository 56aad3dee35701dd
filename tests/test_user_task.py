"""A user's own model and data through the real command line: they learn in simulate, the trained model
comes out as safetensors and reloads to the accuracy the run reported, and export ships those weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.custom_task import digit_features, digit_rows
from examples.imagefolder_digits import write_digit_pngs
from fedfleet.api import load_trained_model
from fedfleet.cli import main
from fedfleet.device_runtime.data import load_dataset

FAST = ["--phones", "5", "--sample", "1", "--local-epochs", "2", "--batch-size", "16"]


def _simulate(out: Path, *flags: str) -> dict:
    assert main(["simulate", "--out", str(out), *FAST, *flags]) == 0
    return json.loads((out / "summary.json").read_text())


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_an_mlp_on_flat_feature_vectors_learns(tmp_path: Path) -> None:
    summary = _simulate(tmp_path, "--model", "mlp", "--dataset", "examples.custom_task:digit_features",
                        "--rounds", "6")
    assert summary["task"]["input_shape"] == [64]  # flat vectors, not a square image
    assert summary["final_accuracy"] > 0.85, summary["final_accuracy"]


# The GRU runs with the per-phone trainer: vmap has no batching rule for aten::gru.
@pytest.mark.parametrize("model, flags", [("conv1d", ["--rounds", "4", "--lr", "0.3"]),
                                          ("gru", ["--trainer", "pool", "--rounds", "6", "--lr", "0.5",
                                                   "--local-epochs", "3"])])
def test_a_users_sequence_model_learns(tmp_path: Path, model: str, flags: list[str]) -> None:
    summary = _simulate(tmp_path, "--model", f"examples.custom_task:{model}", "--dataset",
                        "examples.custom_task:digit_rows", *flags)
    assert summary["task"]["input_shape"] == [8, 8]  # [T, F]
    assert summary["final_accuracy"] > 0.85, summary["final_accuracy"]


def test_an_image_folder_of_pngs_trains(tmp_path: Path) -> None:
    folder = write_digit_pngs(tmp_path / "png", per_class=40)
    summary = _simulate(tmp_path / "run", "--model", "cnn", "--dataset", f"imagefolder:{folder}",
                        "--image-size", "12", "--rounds", "4", "--lr", "0.2")
    assert summary["task"]["input_shape"] == [3, 12, 12]  # RGB, resized: 12 is not a multiple of 4
    assert summary["dataset_sizes"] == {"train": 320, "test": 80}
    assert summary["final_accuracy"] > 0.5, summary["final_accuracy"]


def test_the_final_weights_reload_into_the_model_and_give_the_reported_accuracy(tmp_path: Path) -> None:
    summary = _simulate(tmp_path, "--model", "examples.custom_task:bn_cnn", "--dataset", "digits",
                        "--rounds", "2", "--trainer", "pool")
    assert summary["final_weights"]["version"] == summary["rounds"] == 2
    model = load_trained_model(tmp_path)
    data = load_dataset("digits", seed=0)
    assert _accuracy(model, data.x_test, data.y_test) == pytest.approx(summary["final_accuracy"], abs=1e-9)
    # the file is a plain state_dict: the user's own model class loads it with torch alone
    from safetensors.torch import load_file

    from examples.custom_task import bn_cnn

    mine = bn_cnn((1, 8, 8), 10)
    mine.load_state_dict(load_file(str(tmp_path / "final_weights.safetensors")))
    assert _accuracy(mine.eval(), data.x_test, data.y_test) == pytest.approx(summary["final_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_export_from_a_run_ships_its_trained_weights(tmp_path: Path) -> None:
    _simulate(tmp_path / "run", "--model", "mlp", "--dataset", "examples.custom_task:digit_features",
              "--rounds", "1")
    assert main(["export", "--from-run", str(tmp_path / "run"), "--out", str(tmp_path / "bundle")]) == 0
    from safetensors.numpy import load_file

    from fedfleet.device_runtime.runtimes.loader import load_runtime
    from fedfleet.export.bundle import verify_bundle

    trained = load_file(str(tmp_path / "run" / "final_weights.safetensors"))
    manifest = verify_bundle(tmp_path / "bundle")
    assert manifest.model == "mlp" and manifest.input_shape == (64,)
    shipped = load_file(str(tmp_path / "bundle" / "weights.safetensors"))
    assert shipped.keys() == trained.keys()
    for name in trained:
        np.testing.assert_array_equal(shipped[name], trained[name])
    for kind in ("torch", "onnx", "executorch"):  # each runtime a phone runs starts from them
        params = load_runtime(kind, tmp_path / "bundle").get_params()
        for name, value in params.items():
            np.testing.assert_allclose(value, trained[name], rtol=0, atol=0, err_msg=f"{kind} {name}")


def test_digit_examples_hold_the_shapes_they_claim() -> None:
    x, y, xt, yt = digit_rows(0)
    assert x.shape[1:] == (8, 8) and len(x) + len(xt) == 1797 and set(np.unique(y)) == set(range(10))
    assert digit_features(0)[0].shape[1:] == (64,)


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_run_starts_from_init_weights(tmp_path: Path, kind: str) -> None:
    """A run given a trained model's weights starts from them: after one round at a learning rate too small
    to move it, it is where the first run ended (a run from the seed is near chance after that round)."""
    first = _simulate(tmp_path / "first", "--model", "mlp", "--rounds", "5")
    weights = tmp_path / "first" / "final_weights.safetensors"
    if kind == "torch":
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)), tmp_path / "w.pt")
        weights = tmp_path / "w.pt"
    tiny = ["--model", "mlp", "--rounds", "1", "--lr", "1e-6", "--local-epochs", "1"]
    resumed = _simulate(tmp_path / "resumed", *tiny, "--init-weights", str(weights))
    fresh = _simulate(tmp_path / "fresh", *tiny)
    assert resumed["final_accuracy"] == pytest.approx(first["final_accuracy"], abs=0.01)
    assert fresh["final_accuracy"] < 0.3 < first["final_accuracy"]
