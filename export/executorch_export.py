"""ExecuTorch training program (``model.pte``): forward(x, y) -> (loss, logits) plus gradients.

Recipe (ExecuTorch ``extension/training/examples``): wrap the model so that "the loss is
embedded in the model and is the first output", ``torch.export`` it with a dynamic batch
dimension, turn it into a joint forward+backward graph with ``_export_forward_backward``,
lower it to ExecuTorch. The runtime then returns user outputs, gradients and (aliased)
parameters of every *trainable* parameter; frozen parameters are turned into buffers so
they are plain constants of the program.

XNNPACK packs the weights it is handed when the program loads, so a delegate that read a
trainable parameter would keep computing with the initial weights after every SGD step.
``FrozenOnlyXnnpack`` therefore delegates only partitions that read no trainable parameter
(for transfer learning: the frozen backbone). The lowered program is checked against eager
PyTorch at export, after changing its weights, at the smallest and largest batch; if it
disagrees, the portable kernels are used and the manifest says why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fedfleet.export.bn_decomp import batch_norm_decompositions, min_batch, training_copy
from fedfleet.export.manifest import PTE_PREFIX, UnsupportedExport
from fedfleet.export.pool_decomp import pool_decompositions
from fedfleet.export.pte_evaluate import EVALUATE, eval_error, eval_names, eval_program
from fedfleet.export.state_outputs import (
    STATE_TOLERANCE,
    StatefulLoss,
    example_state,
    program_state_names,
    state_error,
    stateful_copy,
)
from fedfleet.export.task_loss import LossFn, cross_entropy

# Max difference of the loss and of each gradient against eager PyTorch, relative to the larger of 1 and
# that tensor's largest magnitude (batch norm over two examples makes gradients of tens).
SELF_CHECK_TOLERANCE = 1e-5
aten = torch.ops.aten
JOINT_DECOMPOSED = [aten.max_pool2d_with_indices_backward]


class LossWrapper(nn.Module):
    """``forward(x, y) -> (the task's loss, logits)``; the loss must be the first output. ``loss``: the
    task's own (export/task_loss.py), traced into the program; None: mean cross-entropy."""

    def __init__(self, model: nn.Module, loss: LossFn | None = None) -> None:
        super().__init__()
        self.model = model  # parameter FQNs become PTE_PREFIX + plain name
        self.loss = loss or cross_entropy

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)  # [B, num_classes]
        return self.loss(logits, y), logits.detach()


def frozen_as_buffers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``requires_grad=False`` parameters are buffers.

    The joint graph then neither differentiates nor returns them: the program's parameter
    list is exactly ``export.models.trainable_names(model)``.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad:
                del module._parameters[name]
                module.register_buffer(name, param.detach())
    return model


def export_executorch(
    model: nn.Module, input_shape: tuple[int, ...], max_batch: int, loss: LossFn | None = None
) -> tuple[bytes, str]:
    """Serialise the training program for batches of 1..``max_batch``; return it and its backend.

    ExecuTorch plans memory for the upper bound of the dynamic batch, so ``max_batch``
    sets the arena size a phone allocates.
    """
    from executorch.exir import to_edge, to_edge_transform_and_lower

    if max_batch < 2:
        raise ValueError("max_batch must be at least 2")
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedExport("model", "no trainable parameters")
    Programs = dict[str, torch.export.ExportedProgram]
    lowerings: dict[str, Callable[[Programs], object]] = {
        "xnnpack": lambda eps: to_edge_transform_and_lower(
            eps, partitioner=[frozen_only_xnnpack()]
        ).to_executorch(),
        "portable": lambda eps: to_edge(eps).to_executorch(),
    }
    problems = []
    for backend, lower in lowerings.items():
        try:
            # "forward" trains (the joint graph), EVALUATE evaluates (export.pte_evaluate)
            programs = {"forward": _joint_program(model, input_shape, max_batch, loss),
                        EVALUATE: _eval_program(model, input_shape, max_batch)}
            lowered = lower(programs)
            buffer = bytes(lowered.buffer)  # type: ignore[attr-defined]
        except Exception as exc:  # recorded in the manifest, not raised at the user
            problems.append(f"{backend}: {UnsupportedExport.from_exception('lowering', exc).reason}")
            continue
        missing = missing_kernels(lowered)
        if missing:  # the program would load, then fail at its first step (error 0x14)
            problems.append(f"{backend}: {', '.join(missing)} has no ExecuTorch kernel")
            continue
        problem = _self_check(buffer, model, input_shape, max_batch, loss)
        if problem is None:
            return buffer, backend if not problems else f"{backend} ({'; '.join(problems)})"
        problems.append(f"{backend}: {problem}")
    raise UnsupportedExport("model.pte", "; ".join(problems)[:800])


def missing_kernels(lowered: object) -> list[str]:
    """The operators a lowered program calls that this ExecuTorch build has no kernel for (delegated
    partitions call none)."""
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    registered = set(_get_operator_names())
    called = {f"{op.name}.{op.overload}" if op.overload else op.name
              for plan in lowered.executorch_program.execution_plan for op in plan.operators}  # type: ignore[attr-defined]
    return sorted(called - registered)


def frozen_only_xnnpack() -> object:
    """An XNNPACK partitioner that leaves every partition reading a trainable parameter to the
    portable kernels (after ``frozen_as_buffers`` all parameters of the program are trainable)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class FrozenOnlyXnnpack(XnnpackPartitioner):  # type: ignore[misc]
        # Filter the matched op groups before they are merged into partitions, so that the
        # frozen backbone is still delegated when a trainable head follows it.
        def get_matched_nodes_from_configs(
            self, ep: torch.export.ExportedProgram
        ) -> list[list[torch.fx.Node]]:
            params = set(ep.graph_signature.inputs_to_parameters)  # placeholder names
            return [
                group
                for group in super().get_matched_nodes_from_configs(ep)
                if not any(
                    n.name in params or any(a.name in params for a in n.all_input_nodes) for n in group
                )
            ]

    return FrozenOnlyXnnpack()


def _joint_program(
    model: nn.Module, input_shape: tuple[int, ...], max_batch: int, loss: LossFn | None = None
) -> torch.export.ExportedProgram:
    from torch.export.experimental import _export_forward_backward

    # Running statistics in and out (export.state_outputs): forward(x, y, *state) -> (loss, logits, *new state)
    stateful, channel = stateful_copy(frozen_as_buffers(model))
    inner = LossWrapper(stateful, loss)
    wrapper = (StatefulLoss(inner, channel) if channel.names else inner).train()
    state = tuple(example_state(model, channel.names))
    # The example batch is the upper bound: with a small example batch, XNNPACK lowering of
    # MobileNetV3 planned the input for 15 examples instead of max_batch (ExecuTorch 1.5.1).
    x = torch.rand((max_batch, *input_shape), generator=torch.Generator().manual_seed(0))
    y = torch.zeros(max_batch, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        shapes = ({0: batch}, {0: batch}, *[(None,) * len(state)] * bool(state))  # no state: forward(x, y)
        ep = torch.export.export(wrapper, (x, y, *state), dynamic_shapes=shapes, strict=False)
        # Batch norm in training mode is an op outside Core ATen (to_edge refuses it), and adaptive average
        # pooling's backward has no ExecuTorch kernel (export.pool_decomp): written as plain arithmetic
        # before the joint graph, their backward is plain arithmetic too.
        ep = _export_forward_backward(ep.run_decompositions({**batch_norm_decompositions(), **pool_decompositions()}))
        # The portable max_pool2d_with_indices_backward kernel of ExecuTorch 1.5.1 leaves stale
        # values in its output buffer (pytorch/executorch#21686); decompose it into scatter-adds.
        return ep.run_decompositions(torch._decomp.get_decompositions(JOINT_DECOMPOSED))
    except Exception as exc:
        raise UnsupportedExport.from_exception("torch.export of the joint graph", exc) from exc


def _eval_program(model: nn.Module, input_shape: tuple[int, ...], max_batch: int) -> torch.export.ExportedProgram:
    try:
        return eval_program(model, input_shape, max_batch)
    except Exception as exc:
        raise UnsupportedExport.from_exception("torch.export of the evaluation method", exc) from exc


def _self_check(
    buffer: bytes, model: nn.Module, input_shape: tuple[int, ...], max_batch: int, task_loss: LossFn | None = None
) -> str | None:
    """Describe any disagreement of the program with eager PyTorch, else None.

    Before each comparison the weights are changed in both, through the program's aliased
    parameter tensors as the runtime does, so a delegate that cached weights is caught.
    """
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    module = _load_for_executorch_for_training_from_buffer(buffer)  # reads `buffer` in place
    reference = LossWrapper(training_copy(model), task_loss).train()  # what the program computes: see export.bn_decomp
    # One example is no batch for batch norm, and over two or three its backward amplifies float32
    # rounding past the tolerance (the decomposition equals the eager kernel in float64): from 4 on.
    smallest = 1 if min_batch(model) == 1 else min(4, max_batch)
    trainable = {n: p for n, p in reference.model.named_parameters() if p.requires_grad}
    names = program_state_names(model)
    state = [t + 0.5 if t.is_floating_point() else t + 3 for t in example_state(model, names)]  # not the defaults
    gen = torch.Generator().manual_seed(1)
    params: dict[str, torch.Tensor] = {}
    for batch in (smallest, max(smallest, min(3, max_batch)), max_batch, smallest):
        x = torch.rand((batch, *input_shape), generator=gen)
        y = torch.randint(0, 2, (batch,), generator=gen)
        with torch.no_grad():
            for n, p in trainable.items():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
                if n in params:
                    params[n].copy_(p)
        try:
            outputs = module.forward_backward("forward", (x, y, *state))
            loss = outputs[0]
        except RuntimeError as exc:
            return f"batch {batch} does not run: {exc}"
        if not params:  # the first call hands out the aliased weights: start them at the reference
            params = {n.removeprefix(PTE_PREFIX): t for n, t in module.named_parameters().items()}
            shapes = {n: tuple(t.shape) for n, t in params.items()}
            if shapes != {n: tuple(p.shape) for n, p in trainable.items()}:
                return f"program parameters {shapes} are not the trainable parameters"
            with torch.no_grad():
                for n, p in trainable.items():
                    params[n].copy_(p)
            outputs = module.forward_backward("forward", (x, y, *state))
            loss = outputs[0]
        grads = {n.removeprefix(PTE_PREFIX): g for n, g in module.named_gradients().items()}
        ref_loss = reference(x, y)[0]
        ref_grads = dict(zip(trainable, torch.autograd.grad(ref_loss, list(trainable.values())), strict=True))
        err = max(
            [abs(float(loss) - ref_loss.item()) / max(1.0, abs(ref_loss.item()))]
            + [float((grads[n] - g).abs().max()) / max(1.0, float(g.abs().max())) for n, g in ref_grads.items()]
        )
        if err > SELF_CHECK_TOLERANCE:
            return f"batch {batch}: loss/gradients differ from eager by {err:.2e} (relative)"
        err = state_error(outputs[2 : 2 + len(names)], model, x, state, names, trainable)
        if err > STATE_TOLERANCE:
            return f"batch {batch}: running statistics differ from eager by {err:.2e} (relative)"
        # the evaluation method, with the changed weights and statistics
        current = {**trainable, **dict(zip(names, state, strict=True))}
        feed = [current[n].detach() for n in eval_names(model)]
        try:
            logits = module.model.run_method(EVALUATE, (x, *feed))[0]
        except RuntimeError as exc:
            return f"{EVALUATE} at batch {batch} does not run: {exc}"
        err = eval_error(logits, model, x, feed)
        if err > SELF_CHECK_TOLERANCE:
            return f"{EVALUATE} at batch {batch}: logits differ from eager eval mode by {err:.2e} (relative)"
    return None
