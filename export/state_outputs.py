"""Batch norm running statistics as inputs and outputs of the exported training programs.

A phone on ExecuTorch or ONNX Runtime reports the state its training ended with, as the eager phone
does (docs/model-state.md). The programs therefore take each running statistic as an input and
return its updated value beside the loss, with the eager layer's semantics for one training step:

    new_mean = (1 - m) * running_mean + m * batch_mean
    new_var  = (1 - m) * running_var  + m * unbiased_batch_var
    new_count = num_batches_tracked + 1,    m = momentum, or 1 / new_count when momentum is None

``stateful_copy`` writes every batch norm layer in training mode that tracks statistics as a
``BatchNormWithState`` (the arithmetic of ``export.bn_decomp.batch_norm_functional``), which reads its
statistics from a ``StateChannel`` and leaves the new ones there: the program's signature carries them
(``state.<buffer>`` in, ``new_state.<buffer>`` out, in ``export.model_state.state_names`` order), and
no buffer is mutated inside the program (see export.bn_decomp). A model without such a layer has no
state, and its programs' signatures are the same as before.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedfleet.export.bn_decomp import batch_norm_functional, training_copy
from fedfleet.export.model_state import state_names

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# A program's new running statistics against eager PyTorch's, relative to the larger of 1 and each
# tensor's magnitude: the variance of a small batch is a difference of nearly equal float32 sums, which
# the program and the eager kernel round differently (1.1e-5 seen over two examples in ONNX Runtime).
STATE_TOLERANCE = 1e-4


class StateChannel:
    """Running statistics into and out of the layers of one call (a plain object, not a module
    attribute: torch.export refuses tensors assigned to a module while it traces)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def load(self, values: Sequence[torch.Tensor]) -> None:
        if len(values) != len(self.names):
            raise ValueError(f"{len(values)} state tensors for {len(self.names)} running statistics")
        self.inputs, self.outputs = dict(zip(self.names, values, strict=True)), {}

    def collect(self) -> list[torch.Tensor]:
        return [self.outputs[n] for n in self.names]


class BatchNormWithState(nn.Module):
    """A training-mode batch norm layer whose running statistics come from and go to a channel."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, prefix: str, channel: StateChannel) -> None:
        super().__init__()
        for name in ("weight", "bias"):  # the same tensors under the same names: the program's FQNs
            value = getattr(bn, name)
            if value is None or isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:  # a frozen parameter made a buffer (executorch_export.frozen_as_buffers)
                self.register_buffer(name, value)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.keys = [f"{prefix}.{b}" if prefix else b for b in BUFFERS]
        self.channel = channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_key, var_key, count_key = self.keys
        inputs = self.channel.inputs
        count = inputs[count_key] + 1
        momentum = self.momentum if self.momentum is not None else 1.0 / count.to(x.dtype)
        out, _, _, new_mean, new_var = batch_norm_functional(
            x, self.weight, self.bias, inputs[mean_key], inputs[var_key], True, momentum, self.eps)  # type: ignore[arg-type]
        self.channel.outputs.update({mean_key: new_mean, var_key: new_var, count_key: count})
        return out


def program_state_names(model: nn.Module) -> list[str]:
    """The running statistics a model's training programs take and return (``state_names`` of a
    training-mode copy: the user's model is left as it is)."""
    return state_names(copy.deepcopy(model).train())


def inference_state_names(names: Sequence[str]) -> list[str]:
    """The running statistics ``model.onnx`` evaluates with, among a program's ``names``: inputs with the
    exported values as defaults, so a phone evaluates with its own (the counter takes no part)."""
    return [n for n in names if not n.endswith(".num_batches_tracked")]


def stateful_copy(model: nn.Module) -> tuple[nn.Module, StateChannel]:
    """``export.bn_decomp.training_copy`` of ``model``, except that its batch norm layers in training
    mode that track statistics read and update them through the returned channel."""
    names = program_state_names(model)
    channel = StateChannel(names)
    source = training_copy(model)  # its batch norm layers keep no statistics: the channel holds them
    for prefix in dict.fromkeys(n.rpartition(".")[0] for n in names):
        parent, _, child = prefix.rpartition(".")
        if not child:
            raise ValueError("a model that is a batch norm layer itself has no training program")
        layer = source.get_submodule(prefix)
        setattr(source.get_submodule(parent), child, BatchNormWithState(layer, prefix, channel))  # type: ignore[arg-type]
    return source, channel


class StatefulLoss(nn.Module):
    """``forward(x, y, *state) -> (loss, logits, *new_state)`` around a loss wrapper
    ``forward(x, y) -> (loss, logits)`` whose model reads ``channel``."""

    def __init__(self, inner: nn.Module, channel: StateChannel) -> None:
        super().__init__()
        for name, child in inner.named_children():  # the inner wrapper's parameter names are the program's
            self.add_module(name, child)
        self.__dict__["_inner"] = inner  # not a submodule: its children are ours
        self.channel = channel

    def forward(self, x: torch.Tensor, y: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.channel.load(state)
        loss, logits = self.__dict__["_inner"](x, y)
        return (loss, logits, *[t.detach() for t in self.channel.collect()])


def example_state(model: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The model's current running statistics, in ``names`` order (example inputs of an export)."""
    buffers = dict(model.named_buffers())
    return [buffers[n].detach().clone() for n in names]


def eager_state_step(model: nn.Module, x: torch.Tensor, state: Sequence[torch.Tensor], names: Sequence[str],
                     weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """What eager PyTorch's layers make of ``state`` in one training-mode forward pass over ``x`` with
    the trainable ``weights`` (dropout off): the oracle of a program's state outputs."""
    eager = copy.deepcopy(model).train()
    for module in eager.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    buffers, params = dict(eager.named_buffers()), dict(eager.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
        for n, value in zip(names, state, strict=True):
            buffers[n].copy_(value)
        eager(x)
    return [buffers[n].detach().clone() for n in names]


def state_error(got: Sequence[torch.Tensor], model: nn.Module, x: torch.Tensor, state: Sequence[torch.Tensor],
                names: Sequence[str], weights: Mapping[str, torch.Tensor]) -> float:
    """The largest difference of a program's state outputs from eager PyTorch's (``eager_state_step``),
    relative to the larger of 1 and each tensor's magnitude (0.0 for a model without state)."""
    if not names:
        return 0.0
    want = eager_state_step(model, x, state, names, weights)
    return max(float((g.double() - w.double()).abs().max()) / max(1.0, float(w.double().abs().max()))
               for g, w in zip(got, want, strict=True))
