"""Batch norm and dropout in the exported training programs (``model.pte``, ``train_step.onnx``).

``torch.export`` turns a batch norm layer in training mode into
``aten._native_batch_norm_legit_functional``, which is not in Core ATen: ExecuTorch's ``to_edge``
refuses it, and the default decomposition tables keep it. Written as sums, a reciprocal square root
and products (``batch_norm_functional``), its backward is the autograd of those ops, which every
runtime has.

The programs compute the loss and gradients of one batch, which depend on the batch statistics only.
``training_copy`` therefore keeps no running statistics in the layers: no buffer is mutated (an
ExecuTorch joint program with buffer mutations reports its gradient and parameter outputs at indices
offset by the mutations, in ExecuTorch 1.5.1). The running statistics are the programs' inputs and
outputs instead (export/state_outputs.py, docs/model-state.md). Dropout is exported as the identity: a
program's masks would come from the runtime's own generator, which no seed reaches; the programs train
as eager PyTorch does with every mask kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

aten = torch.ops.aten
Tensor = torch.Tensor


def batch_norm_functional(
    x: Tensor,  # [B, C, ...]
    weight: Tensor | None,  # [C]
    bias: Tensor | None,  # [C]
    running_mean: Tensor,  # [C]
    running_var: Tensor,  # [C]
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, batch mean [C], batch 1/std [C], new running mean, new running var)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1], *[1] * (x.dim() - 2)]
    if training:
        # The count of values per channel as a tensor: no symbolic-size arithmetic enters the graph
        # (ExecuTorch's edge dialect has no float ops on symbolic sizes), whatever the batch.
        count = aten.sum.dim_IntList(aten.ones_like(x), dims, True)  # [1, C, 1, ...]
        mean = aten.sum.dim_IntList(x, dims, True) / count
        centered = x - mean
        squares = aten.sum.dim_IntList(centered * centered, dims, True)
        var = squares / count  # biased, as the forward pass normalises
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
        centered = x - mean
    rstd = aten.rsqrt(var + eps)
    out = centered * rstd
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    mean_c, rstd_c = mean.reshape(-1), rstd.reshape(-1)
    if not training:
        return out, mean_c, rstd_c, running_mean, running_var
    # No gradient flows into the running statistics (the eager layer updates them without one).
    unbiased = (squares / (count - 1)).reshape(-1).detach()
    new_mean = running_mean * (1 - momentum) + mean_c.detach() * momentum
    new_var = running_var * (1 - momentum) + unbiased * momentum
    return out, mean_c, rstd_c, new_mean, new_var


def batch_norm_decompositions() -> dict[Any, Callable[..., Any]]:
    return {aten._native_batch_norm_legit_functional.default: batch_norm_functional,
            aten._native_batch_norm_legit.no_stats: batch_norm_no_stats}


def training_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose training-mode batch norm layers normalise with batch statistics and
    keep none, and whose dropout layers are the identity (see the module docstring)."""
    model = copy.deepcopy(model).train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


def batch_norm_no_stats(x: Tensor, weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``aten._native_batch_norm_legit.no_stats``: batch statistics, nothing kept."""
    out, mean, rstd, _, _ = batch_norm_functional(x, weight, bias, x.new_zeros(x.shape[1]), x.new_ones(x.shape[1]),
                                                  True, 0.0, eps)
    return out, mean, rstd


def min_batch(model: nn.Module) -> int:
    """The smallest batch eager PyTorch trains: 2 with batch norm in training mode (one example has
    no variance; ``nn.BatchNorm1d`` refuses it), else 1."""
    model.train()
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()) else 1
