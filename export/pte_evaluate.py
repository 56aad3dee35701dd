"""The evaluation method of ``model.pte``: ``evaluate(x, <param>..., state.<statistic>...) -> logits``.

The training method (``forward``) normalises with batch statistics and computes gradients. A phone
evaluates as eager eval mode does instead: batch norm with running statistics, dropout off. This
method takes the trainable weights and the running means and variances as inputs (as ``model.onnx``
does), so a phone feeds its current weights and its own statistics: an ExecuTorch method cannot read
the weights another method (the training one) mutates. Frozen parameters are constants of the program.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fedfleet.export.manifest import STATE_IN
from fedfleet.export.models import trainable_names
from fedfleet.export.state_outputs import inference_state_names, program_state_names

EVALUATE = "evaluate"  # the method's name in model.pte


def evaluate_signature(names: Sequence[str], state: Sequence[str]) -> tuple[list[str], list[str]]:
    """Input and output names of ``model.pte``'s evaluation method, for trainable parameters ``names`` and
    the training programs' running statistics ``state`` (the counters take no part)."""
    return ["x", *names, *[STATE_IN + n for n in inference_state_names(state)]], ["logits"]


class EvalProgram(nn.Module):
    """``forward(x, *weights, *statistics) -> logits`` of ``model`` in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = eval_names(model)
        self.model = copy.deepcopy(model).eval()

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, tensors, strict=True)), (x,))


def eval_program(model: nn.Module, input_shape: tuple[int, ...], max_batch: int) -> torch.export.ExportedProgram:
    """``EvalProgram`` exported for batches of 1..``max_batch``, frozen parameters as constants."""
    from fedfleet.export.executorch_export import frozen_as_buffers

    program = EvalProgram(frozen_as_buffers(model))
    tensors = eval_inputs(model)
    x = torch.rand((max_batch, *input_shape), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return torch.export.export(program, (x, *tensors), dynamic_shapes=({0: batch}, (None,) * len(tensors)),
                               strict=False)


def eval_names(model: nn.Module) -> list[str]:
    """The weights and statistics the method takes after ``x``, in order."""
    return trainable_names(model) + inference_state_names(program_state_names(model))


def eval_inputs(model: nn.Module) -> list[torch.Tensor]:
    """The model's own weights and statistics, in the method's input order (after ``x``)."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return [named[n].detach().clone() for n in eval_names(model)]


def eval_error(got: torch.Tensor, model: nn.Module, x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> float:
    """The largest difference of the method's logits from eager eval mode with the same weights and
    statistics, relative to the larger of 1 and the logits' magnitude."""
    with torch.no_grad():
        want = EvalProgram(model)(x, *tensors)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
