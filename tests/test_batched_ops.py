"""The batched trainer's pooling (``batched_pool``) and single-channel convolution (``batched_conv``):
one vmapped call for many phones against eager PyTorch phone by phone in float64 (the oracle),
outputs and gradients, padding rows (all zeros) included."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import vmap

from fedfleet.device_runtime.batched_conv import PhoneConv, matmul_convolutions
from fedfleet.device_runtime.batched_conv import fits as conv_fits
from fedfleet.device_runtime.batched_pool import Pool2x2, functional_pooling, pool2x2, strided_pooling
from fedfleet.device_runtime.batched_pool import fits as pool_fits
from tests.test_batched_state import assert_float64_train_many_equals_loop
from tests.test_batched_state import one_thread as one_thread  # autouse: one torch thread here too

F = nn.functional
P, B = 4, 5  # phones, rows per phone; the last two rows of every phone are padding (zeros)


def with_padding(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, B - 2 :] = 0.0
    return x


def eager_grads(fn: Any, inputs: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Phone by phone: outputs [P, ...] and the gradients of sum(output * upstream) for every input."""
    outs, grads = [], []
    for j in range(P):
        mine = [t[j].detach().requires_grad_() for t in inputs]
        out = fn(*mine)
        grads.append(torch.autograd.grad(out, mine, upstream[j]))
        outs.append(out.detach())
    return torch.stack(outs), [torch.stack([g[i] for g in grads]) for i in range(len(inputs))]


@pytest.mark.parametrize(("side", "phone_dim"), [((8, 8), 0), ((7, 9), 0), ((4, 6), 1)])
def test_pooling_equals_max_pool2d_with_ties(side: tuple[int, int], phone_dim: int) -> None:
    """Small integers make many ties in a window (and padding rows are all ties): the gradient goes
    to the first maximum in the kernel's order, as nn.MaxPool2d's indices send it; an odd last
    row or column is dropped."""
    gen = torch.Generator().manual_seed(1)
    x = with_padding(torch.randint(-2, 3, (P, B, 3, *side), generator=gen).double())
    upstream = torch.randn(P, B, 3, side[0] // 2, side[1] // 2, generator=gen, dtype=torch.float64)
    want, (want_grad,) = eager_grads(lambda t: F.max_pool2d(t, 2), [x], upstream)
    leaf = x.movedim(0, phone_dim).contiguous().requires_grad_()
    got = vmap(pool2x2, in_dims=phone_dim)(leaf)
    (grad,) = torch.autograd.grad(got, leaf, upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grad.movedim(phone_dim, 0), want_grad, rtol=0, atol=0)


def test_pooling_fits_only_plain_2x2_windows() -> None:
    assert pool_fits(nn.MaxPool2d(2)) and pool_fits(nn.MaxPool2d((2, 2), stride=2))
    assert not any(pool_fits(m) for m in (nn.MaxPool2d(3), nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1),
                                          nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2, return_indices=True)))


@pytest.mark.parametrize(("kernel", "padding", "input_grad"), [(3, 1, False), (3, 1, True), ((2, 3), (0, 2), True)])
def test_convolution_equals_conv2d(kernel: Any, padding: Any, input_grad: bool) -> None:
    """Outputs, and the gradients of the weight, the bias and (asked for or not) the input."""
    layer = nn.Conv2d(1, 6, kernel, padding=padding).double()
    gen = torch.Generator().manual_seed(2)
    x = with_padding(torch.randn(P, B, 1, 7, 6, generator=gen, dtype=torch.float64))
    w = layer.weight.detach() + torch.randn(P, *layer.weight.shape, generator=gen, dtype=torch.float64)
    b = layer.bias.detach() + torch.randn(P, 6, generator=gen, dtype=torch.float64)  # type: ignore[union-attr]
    pad = (int(layer.padding[0]), int(layer.padding[1]))  # type: ignore[arg-type]
    out_shape = F.conv2d(x[0], w[0], b[0], padding=pad).shape
    upstream = torch.randn(P, *out_shape, generator=gen, dtype=torch.float64)
    want, want_grads = eager_grads(lambda x_, w_, b_: F.conv2d(x_, w_, b_, padding=pad), [x, w, b], upstream)
    leaves = [x.requires_grad_(input_grad), w.requires_grad_(), b.requires_grad_()]
    got = vmap(lambda x_, w_, b_: PhoneConv.apply(x_, w_, b_, pad)[0])(*leaves)
    grads = torch.autograd.grad(got, [t for t in leaves if t.requires_grad], upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, g_want in zip(grads, want_grads[0 if input_grad else 1 :], strict=True):
        torch.testing.assert_close(g, g_want, rtol=0, atol=1e-12)
    one, _ = PhoneConv.apply(x[0].detach(), w[0].detach(), b[0].detach(), pad)  # outside vmap: one phone
    torch.testing.assert_close(one, want[0], rtol=0, atol=1e-12)
    small = [t[0, :2].detach().requires_grad_() if i == 0 else t[0].detach().requires_grad_() for i, t in enumerate(leaves)]
    assert torch.autograd.gradcheck(lambda x_, w_, b_: PhoneConv.apply(x_, w_, b_, pad)[0], small)


def test_convolution_fits_only_single_channel_stride_1() -> None:
    assert conv_fits(nn.Conv2d(1, 8, 3, padding=1)) and conv_fits(nn.Conv2d(1, 8, 5, bias=False))
    assert not any(conv_fits(m) for m in (nn.Conv2d(3, 8, 3), nn.Conv2d(1, 8, 3, stride=2), nn.Conv2d(1, 8, 3, dilation=2),
                                          nn.Conv2d(1, 8, 3, padding="same"), nn.Conv2d(1, 8, 3, padding_mode="reflect")))


class PoolBNCNN(nn.Module):
    """conv(1 channel) -> BN -> ReLU -> MaxPool2d(2) -> conv -> ReLU -> MaxPool2d(2) -> Dropout -> linear,
    pooling and the first convolution as modules (the ones the batched trainer replaces)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Dropout(0.2))
        self.fc = nn.Linear(6 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.mark.parametrize("chunk", [3, 8])
def test_train_many_with_replaced_layers_equals_per_phone_in_float64(digits: Any, chunk: int) -> None:
    torch.manual_seed(0)  # the test's model initialisation only
    model = PoolBNCNN()
    assert_float64_train_many_equals_loop(model, digits, chunk, seed=5)
    assert not any("forward" in vars(m) for m in model.modules())  # every layer's own forward is back


def test_layers_are_replaced_only_inside() -> None:
    conv, pool = nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)
    with matmul_convolutions([conv]), strided_pooling([pool]):
        assert "forward" in vars(conv) and "forward" in vars(pool)
    assert "forward" not in vars(conv) and "forward" not in vars(pool)


@contextmanager
def counting_pool2x2() -> Iterator[list[int]]:
    """Pool2x2's forward calls while inside, one entry each."""
    calls: list[int] = []
    original = Pool2x2.forward

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return original(x)

    Pool2x2.forward = staticmethod(forward)  # type: ignore[method-assign, assignment]
    try:
        yield calls
    finally:
        Pool2x2.forward = staticmethod(original)  # type: ignore[method-assign, assignment]


@pytest.mark.parametrize("pool", [lambda t: torch.max_pool2d(t, 2), lambda t: F.max_pool2d(t, 2),
                                  lambda t: F.max_pool2d(t, kernel_size=(2, 2), stride=2, padding=0)])
def test_functional_pooling_takes_plain_2x2_calls(pool: Any) -> None:
    """Pooling written as a function (the built-in CNN's ``torch.max_pool2d(x, 2)``) is computed by
    Pool2x2 inside ``functional_pooling``, equal to the kernel with ties, values and gradients."""
    gen = torch.Generator().manual_seed(2)
    x = with_padding(torch.randint(-2, 3, (P, B, 3, 6, 8), generator=gen).double())
    upstream = torch.randn(P, B, 3, 3, 4, generator=gen, dtype=torch.float64)
    want, (want_grad,) = eager_grads(pool, [x], upstream)
    leaf = x.clone().requires_grad_()
    with counting_pool2x2() as calls, functional_pooling():
        got = vmap(pool)(leaf)
    (grad,) = torch.autograd.grad(got, leaf, upstream)
    assert calls  # the strided pooling ran, not the kernel
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)


def test_functional_pooling_leaves_other_windows_to_the_kernel() -> None:
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    cases: list[Callable[[torch.Tensor], torch.Tensor]] = [
        lambda t: F.max_pool2d(t, 3), lambda t: F.max_pool2d(t, 2, 1), lambda t: F.max_pool2d(t, 2, padding=1),
        lambda t: F.max_pool2d(t, 2, ceil_mode=True)]
    want = [pool(x) for pool in cases]
    with counting_pool2x2() as calls, functional_pooling():
        got = [pool(x) for pool in cases]
        out, index = F.max_pool2d(x, 2, return_indices=True)  # indices asked for: the kernel's
    assert not calls and index.dtype == torch.int64 and out.shape == (2, 3, 4, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_functional_pooling_is_caught_only_for_models_that_pool_through_functions() -> None:
    """The catching costs a little on every torch call, so train_many enters it only for a model that pools
    a plain 2x2 window through ``torch.max_pool2d`` / ``F.max_pool2d`` (the built-in CNN), not through
    ``nn.MaxPool2d`` modules (already replaced) or not at all."""
    from fedfleet.device_runtime.batched_pool import pools_functionally
    from fedfleet.export.models import ModelSpec, build_model

    example = torch.zeros(1, 1, 8, 8)
    cnn = build_model(ModelSpec("cnn", (1, 8, 8), 10), seed=0)
    assert pools_functionally(cnn, example)
    assert not pools_functionally(PoolBNCNN(), example)
    assert not pools_functionally(build_model(ModelSpec("mlp", (1, 8, 8), 10), seed=0), example)
    assert not pools_functionally(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3)), example)  # not a 2x2 window
    assert cnn.training
