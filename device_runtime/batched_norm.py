"""Batch norm for the batched trainer: every phone's training-mode batch norm in one call.

Inside ``vmap`` each phone's layer sees its own rows ``[B, C, ...]``; the batched convolution before
it holds the chunk's phones folded into its channels, ``[B, P * C, ...]``. ``FoldedBatchNorm`` is an
``autograd.Function`` with its own ``vmap`` rule, so vmap hands it that tensor whole, as a view: per
channel of each phone it takes the statistics over the phone's real rows (a phone's partial last batch
is padded to the chunk's batch size; padding rows never enter a statistic), normalises in place and
differentiates with the closed-form batch norm backward (Ioffe & Szegedy 2015, section 3), one
activation-sized allocation each way instead of the dozen ops autograd would record for the masked
arithmetic. Running statistics are updated from the returned batch mean and variance, per phone, as
``nn.BatchNorm`` updates its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedfleet.device_runtime import vmap_rules

_BatchNorm = nn.modules.batchnorm._BatchNorm


class FoldedBatchNorm(torch.autograd.Function):
    """(x [B, K, L], real [B, K], weight [K] | None, bias [K] | None, eps) -> (y [B, K, L], batch mean [K],
    biased batch variance [K]): batch norm of K channels whose statistics run over the rows ``real``
    marks (1 real, 0 padding) per channel, at all L positions of each; y covers every row. Under vmap
    the phones fold into the channels, K = P * C, so each phone gets its own statistics."""

    @staticmethod
    def forward(x: torch.Tensor, real: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = real.sum(dim=0) * x.shape[2]  # [K] values per channel in the statistics
        mean = (x.sum(dim=2) * real).sum(dim=0) / count  # [K]
        centered = x - mean[:, None]
        var = (torch.linalg.vector_norm(centered, dim=2) ** 2 * real).sum(dim=0) / count  # [K], biased
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        y = centered.mul_(scale[:, None])  # in place: one activation-sized allocation per call
        if bias is not None:
            y.add_(bias[:, None])
        return y, mean, var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        x, real, weight, _bias, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, real, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_stats: Any) -> tuple[torch.Tensor | None, ...]:
        x, real, weight, mean, var = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)  # [K]
        count = real.sum(dim=0) * x.shape[2]  # [K]
        g_sum = grad.sum(dim=(0, 2))  # [K], every row: the bias gradient
        dx = grad * x  # the one activation-sized allocation, reused for dx below
        g_xhat = (dx.sum(dim=(0, 2)) - mean * g_sum) * invstd  # sum grad * x_hat: the weight gradient
        k1 = invstd if weight is None else invstd * weight
        # dx = k1 * (grad - real * (g_sum + x_hat * g_xhat) / count), x_hat = (x - mean) * invstd,
        # that is grad * k1 + real * (x * k2 + k3): padding rows take no part in the statistics.
        k2 = -k1 * g_xhat * invstd / count
        torch.mul(grad, k1[:, None], out=dx)
        dx.addcmul_(x, (real * k2)[:, :, None])
        dx.add_((real * (-k1 * g_sum / count - k2 * mean))[:, :, None])
        needs = ctx.needs_input_grad
        return dx, None, g_xhat if needs[2] else None, g_sum if needs[3] else None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, real: torch.Tensor,
             weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> tuple[Any, Any]:
        """The phones' axis P folds into the channels: [B, C, ...] per phone -> [B, P * C, ...]."""
        p = info.batch_size

        def folded(t: torch.Tensor | None, dim: int | None, channel: int) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.expand(p, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.movedim(0, channel).flatten(channel, channel + 1)

        c = x.shape[1] if in_dims[0] is None else x.movedim(in_dims[0], 0).shape[2]
        y, mean, var = FoldedBatchNorm.apply(
            folded(x, in_dims[0], 1), folded(real, in_dims[1], 1), folded(weight, in_dims[2], 0),
            folded(bias, in_dims[3], 0), eps)
        return (y.unflatten(1, (p, c)), mean.unflatten(0, (p, c)), var.unflatten(0, (p, c))), (1, 0, 0)


@contextmanager
def masked_batch_norm(layers: Sequence[_BatchNorm], rows: list[torch.Tensor]) -> Iterator[None]:
    """While inside, each training-mode batch norm layer takes its statistics over the rows
    ``rows[-1]`` marks real ([B]: 1 real, 0 padding) and updates its running statistics from them as
    ``nn.BatchNorm`` does (``num_batches_tracked + 1``; ``(1 - momentum) * old + momentum * batch``,
    the variance unbiased there, biased in the normalisation). Under vmap each phone sees its own
    rows and buffers. Needs a numeric momentum."""
    for layer in layers:
        layer.forward = _masked_forward(layer, rows)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _masked_forward(layer: _BatchNorm, rows: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:  # x [B, C, ...] for one phone
        if layer.track_running_stats and layer.momentum is None:
            raise NotImplementedError("batch norm with momentum=None (a cumulative average) reads its counter "
                                      "as a number, per phone: not batched")
        b, c = x.shape[0], x.shape[1]
        real = rows[-1].to(x.dtype)[:, None].expand(b, c)
        y, mean, var = vmap_rules.apply(FoldedBatchNorm, x.reshape(b, c, -1), real, layer.weight, layer.bias, layer.eps)
        if layer.track_running_stats:
            momentum = float(layer.momentum)  # type: ignore[arg-type]
            count = rows[-1].sum() * (x.numel() // (b * c))  # values per channel over the real rows
            with torch.no_grad():
                layer.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                layer.running_mean.mul_(1 - momentum).add_(mean * momentum)  # type: ignore[union-attr, operator]
                layer.running_var.mul_(1 - momentum).add_(var * (count / (count - 1)) * momentum)  # type: ignore[union-attr, operator]
        return y.reshape(x.shape)

    return forward
