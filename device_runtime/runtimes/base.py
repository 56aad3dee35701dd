"""The ``TrainingRuntime`` seam shared by the eager, ExecuTorch and ONNX Runtime backends."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters, sent by the server with each task."""

    local_epochs: int = 1  # passes over the phone's data per task
    batch_size: int = 16
    lr: float = 0.05  # plain SGD
    prox_mu: float = 0.0  # FedProx proximal weight (Li et al. 2020); 0 = FedAvg

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be at least 1")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError("lr must be a positive finite number")
        if self.prox_mu < 0:
            raise ValueError("prox_mu must be non-negative")


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
