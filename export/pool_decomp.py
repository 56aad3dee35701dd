"""Adaptive average pooling in the exported training programs (``model.pte``, ``train_step.onnx``).

ExecuTorch 1.5.1 has no kernel for ``aten::_adaptive_avg_pool2d_backward`` (a program that needs it
loads, then fails at its first step with error 0x14, a missing operator), and ``torch.onnx`` has no
translation for it. Written as means over windows of the input, the forward pass is plain arithmetic,
and so is its backward (autograd of reshapes, slices and means), which every runtime has:

- an output side that divides the input side: windows of ``input // output`` rows (or columns), a
  reshape and a mean; an output of 1 is the mean over the whole side;
- any other output side: window ``i`` spans ``floor(i * n / o)`` to ``ceil((i + 1) * n / o)``, as
  ATen's kernel takes it, one slice and mean per output row (or column).

The decomposition equals ATen's kernel up to float rounding (tests/test_export_pool.py) and applies to
the training programs only; ``model.onnx`` keeps the ONNX pooling op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

aten = torch.ops.aten
Tensor = torch.Tensor


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    """ATen's windows of adaptive pooling: ``out`` spans of ``size``, overlapping when ``out`` does not divide it."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _pool_side(x: Tensor, dim: int, out: int) -> Tensor:
    """Average ``x`` along ``dim`` (negative) into ``out`` windows."""
    size = int(x.shape[dim])
    if out == size:
        return x.clone()
    if out == 1:
        return x.mean(dim, keepdim=True)
    if size % out == 0:  # [..., n, *rest] -> [..., out, n / out, *rest], mean over each window
        shape = [-1, *x.shape[1:dim], out, size // out, *(x.shape[dim + 1 :] if dim < -1 else ())]
        return x.reshape(shape).mean(dim)
    return torch.cat([x.narrow(dim, s, e - s).mean(dim, keepdim=True) for s, e in _windows(size, out)], dim)


def _unpool_side(grad: Tensor, dim: int, size: int) -> Tensor:
    """The gradient of ``_pool_side`` along ``dim``: each window's gradient spread evenly over its ``size``
    inputs' span (summed where windows overlap)."""
    out = int(grad.shape[dim])
    if out == size:
        return grad.clone()
    if size % out == 0:  # [..., out, *rest] -> [..., out, k, *rest] -> [..., n, *rest]
        k = size // out
        spread = grad.unsqueeze(dim)
        sizes = [-1] * spread.dim()
        sizes[dim] = k
        shape = [-1, *grad.shape[1:dim], size, *(grad.shape[dim + 1 :] if dim < -1 else ())]
        return spread.expand(sizes).reshape(shape) / k
    total: Tensor | None = None
    for i, (s, e) in enumerate(_windows(size, out)):
        piece = grad.narrow(dim, i, 1)
        sizes = [-1] * piece.dim()
        sizes[dim] = e - s
        pad = [0, 0] * (-dim - 1) + [s, size - e]  # constant_pad_nd lists the last dimension first
        part = aten.constant_pad_nd(piece.expand(sizes) / (e - s), pad, 0.0)
        total = part if total is None else total + part
    assert total is not None
    return total


def adaptive_avg_pool2d(x: Tensor, output_size: Sequence[int]) -> Tensor:  # [B, C, H, W] -> [B, C, oh, ow]
    """``aten._adaptive_avg_pool2d`` as means over windows (module docstring)."""
    oh, ow = (int(s) for s in output_size)
    if oh == ow == 1:  # global pooling: one mean, which XNNPACK delegates (a frozen backbone's)
        return x.mean([-2, -1], keepdim=True)
    return _pool_side(_pool_side(x, -2, oh), -1, ow)


def adaptive_avg_pool2d_backward(grad: Tensor, x: Tensor) -> Tensor:  # [B, C, oh, ow] -> [B, C, H, W]
    """``aten._adaptive_avg_pool2d_backward``: the gradient of ``adaptive_avg_pool2d``."""
    return _unpool_side(_unpool_side(grad, -1, int(x.shape[-1])), -2, int(x.shape[-2]))


def pool_decompositions() -> dict[Any, Callable[..., Any]]:
    """Adaptive average pooling and its backward as means and spreads (module docstring)."""
    # torch.export keeps the composite ``adaptive_avg_pool2d`` unless a table names it
    return {aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d,
            aten._adaptive_avg_pool2d.default: adaptive_avg_pool2d,
            aten._adaptive_avg_pool2d_backward.default: adaptive_avg_pool2d_backward}
