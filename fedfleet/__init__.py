"""fedfleet: federated learning for phones. The command line is ``fedfleet`` (fedfleet.cli); from
Python, the same runs on your own model and data:

    import fedfleet

    summary = fedfleet.run_simulation(model="mypackage.task:make_model", dataset="npz:data.npz",
                                      phones=20, rounds=5, out="runs/mine")
    model = fedfleet.load_trained_model("runs/mine")  # final_weights.safetensors, loaded

Names are imported when first used: ``import fedfleet`` loads neither torch nor the server.
See docs/your-own-task.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfleet.api import load_trained_model, make_dataset, run_simulation
    from fedfleet.device_runtime.data import Dataset, load_dataset
    from fedfleet.export.build import ExportConfig, export_bundle
    from fedfleet.export.refs import ref_of
    from fedfleet.export.task_model import model_fingerprint, task_model
    from fedfleet.export.weights import load_weights, save_weights
    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig
    from fedfleet.server.strategies import CentralDP, FedAvg
    from fedfleet.server.strategy import MergeContext, MergeResult, Strategy, Update
    from fedfleet.simulate_config import SimulateConfig
    from fedfleet.tuning import tune_process

# name -> module that defines it
_EXPORTS = {
    "run_simulation": "fedfleet.api",  # fedfleet simulate from Python; returns summary.json's content
    "load_trained_model": "fedfleet.api",  # a run's final_weights.safetensors in its model
    "make_dataset": "fedfleet.api",  # a Dataset from numpy arrays, checked
    "SimulateConfig": "fedfleet.simulate_config",  # every simulate setting, checked when made
    "Dataset": "fedfleet.device_runtime.data",  # x_train, y_train, x_test, y_test, num_classes
    "load_dataset": "fedfleet.device_runtime.data",  # a --dataset spec, loaded and checked
    "task_model": "fedfleet.export.task_model",  # a --model spec built for a shape and classes, seeded
    "model_fingerprint": "fedfleet.export.task_model",  # what the server compares at registration
    "ref_of": "fedfleet.export.refs",  # MODULE:ATTR of a module-level callable
    "load_weights": "fedfleet.export.weights",  # safetensors (or a weights_only torch file) -> arrays
    "save_weights": "fedfleet.export.weights",  # a module's state_dict -> safetensors
    "ExportConfig": "fedfleet.export.build",  # what fedfleet export makes a bundle from
    "export_bundle": "fedfleet.export.build",  # model (+ weights) -> model.pte, ONNX graphs, manifest
    "Strategy": "fedfleet.server.strategy",  # subclass it: a merge of one's own (docs/strategies.md)
    "Update": "fedfleet.server.strategy",  # one accepted update, as a strategy sees it
    "MergeContext": "fedfleet.server.strategy",  # where a merge happens (version, mode, seeded rng)
    "MergeResult": "fedfleet.server.strategy",  # what a strategy returns
    "FedAvg": "fedfleet.server.strategies",  # the built-in merge: FedAvg/FedAdam/..., robust rules
    "CentralDP": "fedfleet.server.strategies",  # DP-FedAvg as a wrapper around another strategy
    "ServerConfig": "fedfleet.server.config",  # every server setting, checked when made
    "make_app": "fedfleet.server.app",  # the aggregation server: an aiohttp application
    "tune_process": "fedfleet.tuning",  # the process-wide settings the command line makes (gc, files, threads)
}

__all__ = [  # the same names as _EXPORTS
    "CentralDP",
    "Dataset",
    "ExportConfig",
    "FedAvg",
    "MergeContext",
    "MergeResult",
    "ServerConfig",
    "SimulateConfig",
    "Strategy",
    "Update",
    "export_bundle",
    "load_dataset",
    "load_trained_model",
    "load_weights",
    "make_app",
    "make_dataset",
    "model_fingerprint",
    "ref_of",
    "run_simulation",
    "save_weights",
    "task_model",
    "tune_process",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
