"""2x2, stride-2 max pooling for the batched trainer: every phone's pooling in a few elementwise calls.

PyTorch's CPU max-pool kernel for ``[N, C, H, W]`` works plane by plane, slow on the small planes of
a batched step (``[B, P * C, 8, 8]`` for the digits). ``Pool2x2`` takes the maximum of the window's
four strided views instead, over all leading dimensions at once, with the position of each window's
first maximum in the kernel's order ((0, 0), (0, 1), (1, 0), (1, 1)), the indices the kernel would
return; the backward is PyTorch's own on those indices. Results equal ``nn.MaxPool2d(2)``'s (a NaN in
a window gives NaN, but its gradient may go to another position of the window than the kernel's).
Its ``vmap`` rule pools the phone axis with the others, as a leading dimension.

Pooling written as a function (``torch.max_pool2d(x, 2)``, ``F.max_pool2d``, as the built-in CNN
does) is caught by a ``TorchFunctionMode`` (``functional_pooling``) and computed the same way when its
arguments are a plain 2x2 window; other arguments keep PyTorch's kernel.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode

from fedfleet.device_runtime import vmap_rules
from fedfleet.export.model_state import probing


def _corners(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four [..., H/2, W/2] strided views of v [..., H/2, 2, W/2, 2], in the kernel's scan order."""
    return v[..., 0, :, 0], v[..., 0, :, 1], v[..., 1, :, 0], v[..., 1, :, 1]


def _memory_order(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """The permutation putting x's leading (pooled-over) axes in memory order, largest stride first,
    and its inverse: the phone axis of a batched layer is rarely the first in memory."""
    lead = x.dim() - 2
    order = sorted(range(lead), key=lambda d: -x.stride()[d]) + [lead, lead + 1]
    return order, sorted(range(x.dim()), key=order.__getitem__)


def _windows(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).unflatten(-3, (x.shape[-2] // 2, 2))


class Pool2x2(torch.autograd.Function):
    """x [..., H, W] (H and W even) -> (the maximum of each 2x2 window [..., H/2, W/2], the flat
    position in its plane of the window's first maximum, int64: the kernel's indices)."""

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order, back = _memory_order(x)
        a, b, c, d = _corners(_windows(x.permute(order)))
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        w = x.shape[-1]
        below = bottom > top  # strictly: a tie keeps the upper row, as the kernel's scan does
        index = torch.where(below, d > c, b > a).to(torch.int64).add_(below, alpha=w)
        corner = torch.arange(0, x.shape[-2], 2, device=x.device)[:, None] * w + torch.arange(0, w, 2, device=x.device)
        return torch.maximum(top, bottom).permute(back), index.add_(corner).permute(back)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, _index: Any) -> torch.Tensor | None:
        if grad is None:
            return None
        x, index = ctx.saved_tensors
        order, back = _memory_order(x)  # x and index as laid out in memory: flattening them copies nothing
        x, index, grad = x.permute(order), index.permute(order), grad.permute(order)
        h, w = x.shape[-2:]
        out = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.reshape(-1, h // 2, w // 2), x.reshape(-1, h, w), [2, 2], [2, 2], [0, 0], [1, 1], False,
            index.reshape(-1, h // 2, w // 2))
        return out.view(x.shape).permute(back)  # type: ignore[no-any-return]

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None], x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                            tuple[int, int]]:
        """The phone axis is one more leading dimension: pooled with the others, where it is."""
        dim = in_dims[0]
        assert dim is not None  # vmap calls the rule only for a batched input
        dim %= x.dim()
        if dim >= x.dim() - 2:  # the phones among the pooled axes: put them first
            x, dim = x.movedim(dim, 0), 0
        return Pool2x2.apply(x), (dim, dim)


def _pair(v: Any) -> tuple[Any, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _plain(kernel_size: Any, stride: Any, padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
           return_indices: bool = False) -> bool:
    """Whether these max-pooling arguments are a 2x2 window at stride 2 (None or [] stride: the kernel's)."""
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
    return (_pair(kernel_size) == (2, 2) and _pair(stride) == (2, 2) and _pair(padding) == (0, 0)
            and _pair(dilation) == (1, 1) and not ceil_mode and not return_indices)


def fits(layer: nn.MaxPool2d) -> bool:
    """Whether ``layer`` is a plain 2x2, stride-2 max pooling that ``Pool2x2`` computes."""
    return _plain(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode,
                  layer.return_indices)


def pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``nn.MaxPool2d(2)(x)``: an odd last row or column is dropped, as floor mode does."""
    pooled, _ = vmap_rules.apply(Pool2x2, x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2])
    return pooled  # type: ignore[no-any-return]


@contextmanager
def strided_pooling(layers: Sequence[nn.MaxPool2d]) -> Iterator[None]:
    """While inside, each of ``layers`` (those ``fits`` accepts) pools with ``pool2x2``."""
    for layer in layers:
        layer.forward = pool2x2  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


_POOL_FUNCTIONS = (torch.max_pool2d, F.max_pool2d)
_POOL_NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _plain_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The input of a max-pooling function call of a plain 2x2 window; None for any other call."""
    if func not in _POOL_FUNCTIONS:
        return None
    bound = dict(zip(_POOL_NAMES, args, strict=False)) | kwargs
    x = bound.pop("input", None)
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and "kernel_size" in bound and _plain(**{"stride": None, **bound}):
        return x
    return None


class _FunctionalPooling(TorchFunctionMode):
    """Notes whether a plain 2x2 max-pooling function ran (``found``) and, with ``replace``, pools it with
    ``pool2x2``."""

    def __init__(self, replace: bool) -> None:
        super().__init__()
        self.replace, self.found = replace, False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        x = _plain_call(func, args, kwargs)
        self.found = self.found or x is not None
        return pool2x2(x) if x is not None and self.replace else func(*args, **kwargs)


_FUNCTIONAL: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], bool]] = weakref.WeakKeyDictionary()


def pools_functionally(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``model``'s forward pass on ``example`` (one example with its batch axis) pools a plain 2x2
    window through a function rather than an ``nn.MaxPool2d`` (found once per model and input shape, in
    eval mode without gradients; the model is left in train mode)."""
    shapes = _FUNCTIONAL.setdefault(model, {})
    key = tuple(example.shape)
    if key not in shapes:
        layers = [m for m in model.modules() if isinstance(m, nn.MaxPool2d) and fits(m)]
        probe = _FunctionalPooling(replace=False)
        with probing(model), strided_pooling(layers), probe:
            model(example)
        shapes[key] = probe.found
    return shapes[key]


@contextmanager
def functional_pooling() -> Iterator[None]:
    """While inside (on this thread), ``torch.max_pool2d`` and ``F.max_pool2d`` of a plain 2x2 window
    pool with ``pool2x2``."""
    with _FunctionalPooling(replace=True):
        yield
