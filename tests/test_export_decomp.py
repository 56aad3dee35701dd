"""The convolution-backward decomposition used for train_step.onnx, against ATen's kernel,
and the exporter naming what it cannot express."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfleet.export.manifest import UnsupportedExport
from fedfleet.export.onnx_decomp import convolution_backward
from fedfleet.export.onnx_export import export_train_step_onnx

aten = torch.ops.aten


@pytest.mark.parametrize("side", (7, 8))
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("padding", (0, 1))
@pytest.mark.parametrize("dilation", (1, 2))
def test_matches_aten_convolution_backward(side: int, stride: int, padding: int, dilation: int) -> None:
    gen = torch.Generator().manual_seed(side * 100 + stride * 10 + padding + dilation)
    x = torch.randn(3, 4, side, side, generator=gen)
    w = torch.randn(5, 4, 3, 3, generator=gen)
    out = aten.convolution(x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1)
    grad = torch.randn(out.shape, generator=gen)
    conv_args = ([5], [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1, [True, True, True])
    expected = aten.convolution_backward(grad, x, w, *conv_args)
    actual = convolution_backward(grad, x, w, *conv_args)
    for e, a in zip(expected, actual, strict=True):
        assert a is not None and a.shape == e.shape
        assert torch.allclose(a, e, atol=1e-4, rtol=1e-5)


def test_grouped_weight_gradient_is_named_as_unsupported() -> None:
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    grad = torch.randn(2, 4, 4, 4)
    args = (None, [1, 1], [0, 0], [1, 1], False, [0, 0], 4)
    grad_x = convolution_backward(grad, x, w, *args, [True, False, False])[0]
    assert grad_x is not None
    expected = aten.convolution_backward(
        grad, x, w, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 4, [True, False, False]
    )[0]
    assert torch.allclose(grad_x, expected, atol=1e-5)
    with pytest.raises(UnsupportedExport, match="grouped") as info:
        convolution_backward(grad, x, w, *args, [False, True, False])
    assert info.value.op == "aten.convolution_backward"


def test_train_step_export_names_the_op_it_cannot_express(tmp_path: Path) -> None:
    """A trainable depthwise convolution: its weight gradient is not decomposed, and the
    exporter says so instead of writing a wrong graph."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(72, 3)
    )
    with pytest.raises(UnsupportedExport) as info:
        export_train_step_onnx(model, (2, 8, 8), tmp_path / "step.onnx")
    assert "convolution_backward" in info.value.op
    assert "groups=2" in info.value.reason
    assert not (tmp_path / "step.onnx").exists()
