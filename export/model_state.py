"""Which buffers of a model are its federated state (docs/model-state.md).

The state is what local training changes besides the trainable parameters: the running statistics
of batch norm layers in training mode that track them. A layer a model keeps in eval mode (a frozen
backbone) has none: it never changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def state_names(model: nn.Module) -> list[str]:
    """Buffers training changes, in ``named_modules`` order; call after ``model.train()`` (which a
    model may override to keep parts in eval mode)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            names += [f"{prefix}.{n}" if prefix else n for n, b in module.named_buffers(recurse=False) if b is not None]
    return names


def get_state(model: nn.Module, names: Sequence[str]) -> dict[str, np.ndarray]:
    buffers = dict(model.named_buffers())
    return {n: buffers[n].detach().numpy().copy() for n in names}


def initial_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The state a model starts from (its buffers as built), with the model left in train mode."""
    model.train()
    return get_state(model, state_names(model))


@contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """While inside, ``model`` is in eval mode without gradients (a probe's forward pass moves no running
    statistic); afterwards in train mode, as ``train_many`` puts it."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()
