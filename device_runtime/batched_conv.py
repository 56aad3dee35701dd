"""Convolution of one input channel for the batched trainer: every phone's layer as one batched matmul.

Under ``vmap`` a convolution whose input and weight both carry the phone axis becomes a grouped
convolution (one group per phone). For a first layer on single-channel images (``Conv2d(1, C, k)``)
that kernel is slow: each group is a tiny ``[C, k * k]`` by ``[k * k, H * W]`` product. ``PhoneConv``
is an ``autograd.Function`` with its own ``vmap`` rule: it lays every phone's input out as columns
(im2col, ``[P, k * k, B * H * W]``, one strided copy per kernel position) and multiplies them by the
phones' weights ``[P, C, k * k]`` in one ``torch.baddbmm``; the weight's gradient is one ``torch.bmm``
with the same columns and the input's, when asked for, one ``bmm`` folded back (col2im). The output
``[P, B, C, H', W']`` is a view of ``[P, C, B, H', W']``, whose phone and channel axes merge without a
copy for the batch norm that follows (``batched_norm``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from fedfleet.device_runtime import vmap_rules


def fits(layer: nn.Conv2d) -> bool:
    """Whether ``layer`` is a stride-1, undilated, ungrouped, zero-padded convolution of one input
    channel with numeric padding: the case measured faster as a batched matmul."""
    return (type(layer) is nn.Conv2d and layer.in_channels == 1 and layer.groups == 1
            and tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def _columns(x: torch.Tensor, kh: int, kw: int, ph: int, pw: int) -> torch.Tensor:
    """x [P, B, Cin, H, W] -> [P, Cin * kh * kw, B * H' * W'] (im2col, in the weight's (Cin, kh, kw) order)."""
    p, b, cin, h, w = x.shape
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 1, 3, 4)  # [P, Cin, B, H + 2ph, W + 2pw], a view
    cols = x.new_empty(p, cin, kh, kw, b, ho, wo)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j].copy_(padded[..., i : i + ho, j : j + wo])
    return cols.view(p, cin * kh * kw, b * ho * wo)


class PhoneConv(torch.autograd.Function):
    """(x [P, B, Cin, H, W], weight [P, Cout, Cin, kh, kw], bias [P, Cout] | None, padding (ph, pw)) ->
    ([P, B, Cout, H', W'], columns): each phone's stride-1 convolution. Without the leading P (one phone, outside
    vmap) the same, P = 1."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the columns: kept for the weight's gradient, k * k times the input's size)."""
        single = weight.dim() == 4
        if single:
            x, weight, bias = x[None], weight[None], None if bias is None else bias[None]
        p, b = x.shape[:2]
        cout, _, kh, kw = weight.shape[1:]
        cols = _columns(x, kh, kw, *padding)
        flat = weight.reshape(p, cout, -1)
        y = torch.bmm(flat, cols) if bias is None else torch.baddbmm(bias[:, :, None], flat, cols)
        ho, wo = x.shape[3] + 2 * padding[0] - kh + 1, x.shape[4] + 2 * padding[1] - kw + 1
        y = y.view(p, cout, b, ho, wo).transpose(1, 2)  # [P, B, Cout, H', W'], a view
        return (y[0], cols[0]) if single else (y, cols)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, weight, bias, padding = inputs
        ctx.shape = x.shape
        ctx.padding = padding
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], weight)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, _cols: Any) -> tuple[torch.Tensor | None, ...]:
        if grad is None:
            return None, None, None, None
        cols, weight = ctx.saved_tensors
        single = weight.dim() == 4
        if single:
            cols, weight, grad = cols[None], weight[None], grad[None]
        p, b, cin, h, w = (1, *ctx.shape) if single else ctx.shape
        cout, _, kh, kw = weight.shape[1:]
        ph, pw = ctx.padding
        g = grad.transpose(1, 2).reshape(p, cout, -1)  # [P, Cout, B * H' * W']
        needs = ctx.needs_input_grad
        dx = dw = db = None
        if needs[1]:
            dw = torch.bmm(g, cols.transpose(1, 2)).view(weight.shape)
        if ctx.has_bias and needs[2]:
            db = g.sum(dim=2)
        if needs[0]:
            ho, wo = grad.shape[3:]
            dcols = torch.bmm(weight.reshape(p, cout, -1).transpose(1, 2), g)  # [P, Cin * kh * kw, B * H' * W']
            dcols = dcols.view(p, cin * kh * kw, b, ho * wo).transpose(1, 2).reshape(p * b, cin * kh * kw, ho * wo)
            dx = F.fold(dcols, (h, w), (kh, kw), padding=(ph, pw)).view(p, b, cin, h, w)
        if single:
            dx, dw, db = (None if t is None else t[0] for t in (dx, dw, db))
        return dx, dw, db, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None, padding: tuple[int, int]) -> tuple[Any, tuple[int, int]]:
        """The phone axis P first on every input (an unbatched one expanded to it)."""
        def first(t: torch.Tensor, dim: int | None) -> torch.Tensor:
            return t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)

        return PhoneConv.apply(first(x, in_dims[0]), first(weight, in_dims[1]),
                               None if bias is None else first(bias, in_dims[2]), padding), (0, 0)


@contextmanager
def matmul_convolutions(layers: Sequence[nn.Conv2d]) -> Iterator[None]:
    """While inside, each of ``layers`` (those ``fits`` accepts) convolves with ``PhoneConv``."""
    for layer in layers:
        layer.forward = _forward(layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _forward(layer: nn.Conv2d) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:  # x [B, 1, H, W] for one phone
        y, _ = vmap_rules.apply(PhoneConv, x, layer.weight, layer.bias, tuple(layer.padding))
        return y  # type: ignore[no-any-return]

    return forward
