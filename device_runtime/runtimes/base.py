"""The ``TrainingRuntime`` seam shared by the eager, ExecuTorch and ONNX Runtime backends."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedfleet.protocol.plan import TrainPlan

# Local training hyper-parameters, sent by the server with each task: the protocol's TrainPlan
# (its defaults and limits are the server's; protocol/plan.py).
TrainConfig = TrainPlan


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean loss over every step of the task
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@runtime_checkable
class TrainingRuntime(Protocol):
    """A model a phone can train: parameters in and out as named numpy arrays.

    ``get_params``/``set_params`` cover the trainable parameters only (what is uploaded);
    frozen parameters stay inside the runtime.
    """

    name: str

    def param_names(self) -> list[str]: ...

    def get_params(self) -> dict[str, np.ndarray]: ...

    def set_params(self, params: Mapping[str, np.ndarray]) -> None: ...

    def train(self, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> TrainResult: ...

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalResult: ...


def iterate_batches(n: int, cfg: TrainConfig, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches for ``cfg.local_epochs`` shuffled passes; every runtime uses this, so a
    seed gives every backend the same batch order."""
    for _ in range(cfg.local_epochs):
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            yield order[start : start + cfg.batch_size]


@runtime_checkable
class StatefulRuntime(Protocol):
    """A runtime that carries non-trainable state (batch norm running statistics) between tasks: it
    starts from the state it is given and reports the state its training ended with (FORMAT.md
    section 11). Every backend is one; a model without state has an empty one."""

    def get_state(self) -> dict[str, np.ndarray]: ...

    def set_state(self, state: Mapping[str, np.ndarray]) -> None: ...


def score_logits(logits: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(summed cross-entropy, correct predictions) of one batch's logits ``[B, classes]``: a stable
    log-softmax in float64, as the ONNX Runtime and ExecuTorch phones evaluate."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].sum()), int((logits.argmax(axis=1) == y).sum())
