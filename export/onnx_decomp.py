"""Decompositions that turn a training step's backward into standard ONNX ops.

``make_fx(step, decomposition_table=training_decompositions())`` rewrites the aten
backward ops that ``torch.onnx`` cannot translate, or translates wrongly, into forward ops:

- ``convolution_backward`` has no ONNX counterpart: grad_x is a transposed convolution of
  grad_output with the same weight; grad_w is a convolution of the input (channels as the
  batch) with grad_output (batch as the channels), with stride and dilation swapped
  (Dumoulin & Visin 2016, "A guide to convolution arithmetic", section 4); grad_b a sum.
- ``max_pool2d_with_indices_backward``: torch._decomp's scatter-add version.
- ``nll_loss_forward``/``nll_loss_backward``/``_log_softmax_backward_data``/``threshold_backward``:
  onnxscript 0.7.2 translates nll_loss with a normaliser of 1, so mean-reduced gradients come
  out batch-size times too large; the torch._decomp versions divide by the batch explicitly.
- ``_adaptive_avg_pool2d_backward`` has no ONNX translation: ``export.pool_decomp``'s means and spreads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._decomp import get_decompositions

from fedfleet.export.manifest import UnsupportedExport
from fedfleet.export.pool_decomp import pool_decompositions

aten = torch.ops.aten

_TORCH_DECOMPOSED = (
    aten.max_pool2d_with_indices_backward,
    aten.nll_loss_forward,
    aten.nll_loss_backward,
    aten._log_softmax_backward_data,
    aten.threshold_backward,
)


def convolution_backward(
    grad_out: torch.Tensor,  # [B, O, Ho, Wo]
    x: torch.Tensor,  # [B, I, H, W]
    weight: torch.Tensor,  # [O, I / groups, kh, kw]
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``aten.convolution_backward`` for 2-d, non-transposed convolutions, as convolutions."""
    del bias_sizes, output_padding  # only used by transposed forward convolutions
    if transposed or weight.dim() != 4:
        raise UnsupportedExport(
            "aten.convolution_backward", "only 2-d non-transposed convolutions are decomposed"
        )
    grad_x = grad_w = grad_b = None
    if output_mask[0]:
        # A strided forward floors the output size; output_padding restores the lost rows/columns.
        lost = [
            x.shape[2 + i]
            - (
                (grad_out.shape[2 + i] - 1) * stride[i]
                - 2 * padding[i]
                + dilation[i] * (weight.shape[2 + i] - 1)
                + 1
            )
            for i in range(2)
        ]
        grad_x = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, lost, groups)
    if output_mask[1]:
        if groups != 1:
            raise UnsupportedExport(
                "aten.convolution_backward",
                f"the weight gradient of a grouped convolution (groups={groups}) is not decomposed",
            )
        # [I, B, H, W] (*) [O, B, Ho, Wo] -> [I, O, kh', kw']; kh' >= kh when the stride does not divide evenly
        grad_w = aten.convolution(
            x.transpose(0, 1), grad_out.transpose(0, 1), None, dilation, padding, stride, False, [0, 0], 1
        )
        grad_w = grad_w.transpose(0, 1)[:, :, : weight.shape[2], : weight.shape[3]]
    if output_mask[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3))
    return grad_x, grad_w, grad_b


def training_decompositions() -> dict[Any, Callable[..., Any]]:
    table: dict[Any, Callable[..., Any]] = dict(get_decompositions(list(_TORCH_DECOMPOSED)))
    table[aten.convolution_backward.default] = convolution_backward
    return {**table, **pool_decompositions()}
