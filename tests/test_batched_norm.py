"""The batched trainer's batch norm (``batched_norm``): one vmapped call for many phones, each with its
own statistics over its real rows, against eager PyTorch phone by phone in float64 (the oracle)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedfleet.device_runtime.batched_norm import masked_batch_norm
from tests.test_batched_state import assert_float64_train_many_equals_loop
from tests.test_batched_state import one_thread as one_thread  # autouse: one torch thread here too

REAL = (6, 3, 2, 5, 4)  # real rows per phone; every phone's batch is padded to 6 rows


def oracle(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, real: int) -> torch.Tensor:
    """Every row normalised with the statistics of the first ``real`` rows (differentiable through
    them); runs the eager layer on the real rows alone, which updates its running statistics."""
    layer(x[:real])
    dims = [0, *range(2, x.dim())]
    mean = x[:real].mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(x[:real].var(dim=dims, unbiased=False, keepdim=True) + layer.eps)
    if layer.affine:
        at = (1, -1, *[1] * (x.dim() - 2))
        y = y * layer.weight.reshape(at) + layer.bias.reshape(at)
    return y


@pytest.mark.parametrize(("make", "shape"), [
    (lambda: nn.BatchNorm2d(3, momentum=0.3), (3, 4, 5)),
    (lambda: nn.BatchNorm1d(4, affine=False), (4,)),
    (lambda: nn.BatchNorm1d(2, eps=1e-3), (2, 7)),
])
def test_each_phone_gets_its_own_statistics_and_gradients(make: Any, shape: tuple[int, ...]) -> None:
    """Outputs of every row (padding rows too, normalised with the real rows' statistics), the
    gradients of the input and of each phone's weight and bias, and the running statistics."""
    gen = torch.Generator().manual_seed(3)
    layer = make().double()
    p, b = len(REAL), max(REAL)
    x = (torch.randn(p, b, *shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    upstream = torch.randn(p, b, *shape, generator=gen, dtype=torch.float64)
    mask = (torch.arange(b)[None, :] < torch.tensor(REAL)[:, None]).double()  # [P, B]
    params = {n: (t.detach()[None] + torch.randn(p, *t.shape, generator=gen, dtype=torch.float64)).requires_grad_()
              for n, t in layer.named_parameters()}
    buffers = {n: t[None].repeat(p, *[1] * t.dim()) for n, t in layer.named_buffers()}
    buffers["running_var"] = buffers["running_var"] + torch.rand(p, shape[0], generator=gen, dtype=torch.float64)

    want_buffers = {n: t.clone() for n, t in buffers.items()}
    want_y, want_grads = [], []
    for j, real in enumerate(REAL):
        phone = make().double()
        with torch.no_grad():
            for n, t in [*phone.named_parameters(), *phone.named_buffers()]:
                t.copy_(params[n][j] if n in params else buffers[n][j])
        xj = x.detach()[j].clone().requires_grad_()
        y = oracle(phone, xj, real)
        want_y.append(y.detach())
        want_grads.append(torch.autograd.grad(y, [xj, *phone.parameters()], upstream[j]))
        for n, t in phone.named_buffers():
            want_buffers[n][j] = t

    rows: list[torch.Tensor] = []

    def forward(w: dict[str, torch.Tensor], s: dict[str, torch.Tensor], real: torch.Tensor, xj: torch.Tensor) -> torch.Tensor:
        rows.append(real)
        try:
            return functional_call(layer, (w, s), (xj,))
        finally:
            rows.pop()

    layer.train()
    with masked_batch_norm([layer], rows):
        y = vmap(forward)(params, buffers, mask, x)
    grads = torch.autograd.grad(y, [x, *params.values()], upstream)
    torch.testing.assert_close(y.detach(), torch.stack(want_y), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], torch.stack([g[0] for g in want_grads]), rtol=0, atol=1e-12)
    for i, n in enumerate(params, start=1):
        torch.testing.assert_close(grads[i], torch.stack([g[i] for g in want_grads]), rtol=0, atol=1e-12, msg=n)
    for n, t in want_buffers.items():
        torch.testing.assert_close(buffers[n], t, rtol=0, atol=1e-12, msg=n)
    assert int(buffers["num_batches_tracked"][0]) == 1
    assert "forward" not in vars(layer)  # the layer's own forward is back


class MixedNormNet(nn.Module):
    """conv -> BN2d -> ReLU -> pool -> Dropout -> linear -> BN1d without affine -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.bn1 = nn.BatchNorm1d(8, affine=False, momentum=0.2)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))
        return self.fc2(torch.relu(self.bn1(self.fc1(h))))


@pytest.mark.parametrize("chunk", [5, 8])
def test_train_many_equals_per_phone_in_float64(digits: Any, chunk: int) -> None:
    """Deltas, losses and every phone's running statistics, with partial batches, dropout, a layer
    without affine parameters and chunks of 5 (not dividing the 8 phones) and of all 8."""
    torch.manual_seed(0)  # the test's model initialisation only
    assert_float64_train_many_equals_loop(MixedNormNet(), digits, chunk, seed=9)
