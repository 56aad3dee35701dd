"""fedfleet from Python: the runs of the command line, given objects or specs.

    import fedfleet

    summary = fedfleet.run_simulation(model=my_package.make_model, dataset="npz:data.npz", phones=20, rounds=5)
    model = fedfleet.load_trained_model(summary["config"]["out"])

A model or dataset callable must be defined at the top level of an importable module: the server and
the phones import it by ``MODULE:ATTR`` (``fedfleet.ref_of`` gives that name).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfleet.device_runtime.data import Dataset
from fedfleet.device_runtime.task_data import check_arrays
from fedfleet.export.refs import ref_of
from fedfleet.simulate_config import SimulateConfig

if TYPE_CHECKING:
    from torch import nn

ModelArg = str | Callable[..., "nn.Module"]
DatasetArg = str | Callable[..., Any] | Dataset


def make_dataset(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int | None = None, name: str = "python") -> Dataset:
    """A Dataset from arrays in memory, checked as ``--dataset`` data is (lengths, NaN, labels in
    ``[0, num_classes)``, a non-empty test split); ValueError saying what is wrong."""
    spec = f"arrays:{name}"
    x, y, xt, yt, classes = check_arrays(spec, x_train, y_train, x_test, y_test, num_classes)
    return Dataset(spec, x, y, xt, yt, classes)


def run_simulation(config: SimulateConfig | None = None, *, model: ModelArg | None = None,
                   dataset: DatasetArg | None = None, progress: bool = False, **settings: Any) -> dict[str, Any]:
    """``fedfleet simulate`` from Python: a server on loopback and an emulated fleet. ``config`` (default
    SimulateConfig()) with ``settings`` (SimulateConfig fields, e.g. phones=20, rounds=5) replaced;
    ``model``: a built-in name, ``MODULE:ATTR`` or a module-level callable returning a torch.nn.Module;
    ``dataset``: a spec string, a module-level callable (see device_runtime/task_data.py) or a Dataset
    (``make_dataset``); ``loss=``, ``metrics=`` (settings): the task's own, ``MODULE:ATTR`` or module-level
    callables (export/task_loss.py; default cross-entropy and no metrics). Writes config.out as the command does (metrics.jsonl, summary.json,
    final_weights.safetensors) and returns the summary. ``progress``: print the round table."""
    from fedfleet.simulate import run
    from fedfleet.task import prepare_task

    data: Dataset | None = None
    if model is not None:
        settings["model"] = ref_of(model, "model")
    for name in ("loss", "metrics"):  # a callable's MODULE:ATTR, as phones and the server import it
        if settings.get(name) is not None:
            settings[name] = ref_of(settings[name], name)
    if isinstance(dataset, Dataset):
        data, settings["dataset"] = dataset, dataset.name
    elif dataset is not None:
        settings["dataset"] = ref_of(dataset, "dataset")
    cfg = (config or SimulateConfig()).replace(**settings)
    task = prepare_task(cfg.model, data or cfg.dataset, cfg.seed, cfg.image_size, cfg.init_weights, cfg.loss,
                        cfg.metrics, cfg.partition, cfg.runtime, cfg.attack)
    return run(cfg, data=task.data, show_table=progress)


def load_trained_model(run_dir: str | Path) -> nn.Module:
    """The model a ``simulate`` run trained (``run_dir``: its --out), its final_weights.safetensors loaded,
    in eval mode."""
    from fedfleet.export.task_model import task_model
    from fedfleet.export.weights import fit_weights, load_weights
    from fedfleet.task import FINAL_WEIGHTS

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    task, config = summary["task"], summary["config"]
    model = task_model(task["model"], tuple(task["input_shape"]), int(task["num_classes"]), int(config["seed"]))
    weights = run_dir / FINAL_WEIGHTS
    fit_weights(model, load_weights(weights, "weights", allow_torch=False), str(weights))
    return model.eval()
