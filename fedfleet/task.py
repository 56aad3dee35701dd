"""The user's task as every command checks it before a server starts (the dataset loaded and checked,
the model built and run on one batch of it, initial weights fitted), and the trained model written out
of a run's store as a safetensors state_dict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedfleet.device_runtime.data import Dataset, load_dataset
from fedfleet.server.config import ServerConfig

FINAL_WEIGHTS = "final_weights.safetensors"


@dataclass(frozen=True)
class PreparedTask:
    data: Dataset
    fingerprint: str  # export.task_model.model_fingerprint of the model (and of the loss, when not built in)
    metric_names: tuple[str, ...] = ()  # what the task's metrics (--metrics) return on the model's outputs


def prepare_task(model: str, dataset: str | Dataset, seed: int = 0, image_size: int = 32,
                 init_weights: str | None = None, loss: str | None = None,
                 metrics: str | None = None, partition: str = "iid", runtime: str = "torch",
                 attack: str = "none") -> PreparedTask:
    """Load ``dataset`` (a spec, or a Dataset as is) and build ``model`` for it. ValueError naming the flag
    (--dataset, --model, --init-weights, --loss, --metrics) and what is wrong: a bad MODULE:ATTR, data with
    mismatched lengths, NaN or bad labels, a model that fails on the data, weights that do not fit, a loss
    that is not a finite scalar tensor of the model's outputs, metrics that are not ``{name: float}``
    (export/task_loss.py); for a regression (float targets), a ``partition`` by label, a ``runtime``
    other than torch (exported training programs take class labels) or a label-flipping ``attack``."""
    from fedfleet.export.task_loss import check_task
    from fedfleet.export.task_model import check_forward, model_fingerprint, task_model

    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, seed=seed, image_size=image_size)
    built = task_model(model, data.input_shape, data.num_classes, seed, init_weights)
    check_forward(built, data.input_shape, data.num_classes, "--model", model, data.regression)
    if data.regression and partition != "iid":
        raise ValueError(f"--partition {partition}: splits by class label; a regression task (float targets) "
                         "splits iid")
    if data.regression and runtime != "torch":
        raise ValueError(f"--runtime {runtime}: exported training programs take class labels; a regression "
                         "task (float targets) trains with --runtime torch")
    if data.regression and attack.startswith("labelflip"):
        raise ValueError(f"--attack {attack}: flips class labels; a regression task (float targets) has none "
                         "(signflip, scale:F and noise:STD attack any task)")
    names = check_task(built, data.x_train, data.y_train, loss, metrics)
    return PreparedTask(data, model_fingerprint(built, loss), tuple(names))


def write_final_weights(config: ServerConfig, data_dir: str | Path, path: str | Path) -> tuple[int, Path] | None:
    """The newest version in ``data_dir``'s store, loaded into the task's model, written as a safetensors
    state_dict at ``path``; (its version, path), or None when the store holds no version."""
    from fedfleet.protocol import decode_message
    from fedfleet.server.store import Store

    db = Path(data_dir) / "server.sqlite"
    if not db.is_file():
        return None
    store = Store(str(db))
    from fedfleet.server.kept_state import KEPT_STATE, restore_state

    try:
        latest, kept = store.latest_version(), store.get_meta(KEPT_STATE)  # kept: --local-state's state
    finally:
        store.close()
    if latest is None:
        return None
    version, blob = latest
    return version, save_trained(config, restore_state(decode_message(blob).tensors, kept), path)


def save_trained(config: ServerConfig, tensors: dict, path: str | Path) -> Path:  # type: ignore[type-arg]
    """The task's model (seed and initial weights, as the server started) with ``tensors`` (the trained
    parameters, and whatever state the server federates) loaded over it, saved as safetensors."""
    import numpy as np
    import torch

    from fedfleet.export.task_model import task_model
    from fedfleet.export.weights import save_weights
    from fedfleet.protocol.state import split_state

    model = task_model(config.model, config.input_shape, config.num_classes, config.seed, config.init_weights)
    state = model.state_dict()
    params, buffers = split_state(tensors)  # the server's "state:NAME" tensors are the model's buffers NAME
    with torch.no_grad():
        for name, value in {**params, **buffers}.items():
            if name in state:
                state[name].copy_(torch.from_numpy(np.asarray(value)).to(state[name].dtype))
    return save_weights(path, model)
