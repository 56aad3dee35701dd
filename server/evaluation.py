"""Server-side evaluation of each published version on the held-out split."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from export.models import ModelSpec, build_model


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float


class Evaluator:
    """Holds one eager model and the test split; ``evaluate`` loads parameters and scores them."""

    def __init__(self, spec: ModelSpec, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> None:
        if len(x_test) != len(y_test) or len(x_test) == 0:
            raise ValueError("the test split needs as many labels as examples, and at least one")
        self.model = build_model(spec, seed=seed)
        self.x = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(y_test, dtype=np.int64))

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, np.ndarray], batch_size: int = 512) -> Evaluation:
        named = dict(self.model.named_parameters())
        for name, value in params.items():
            named[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(self.x), batch_size):
            logits = self.model(self.x[start : start + batch_size])
            yb = self.y[start : start + batch_size]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        return Evaluation(loss=loss_sum / len(self.x), accuracy=correct / len(self.x))
