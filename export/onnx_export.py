"""ONNX artifacts: ``model.onnx`` (inference) and ``train_step.onnx`` (one SGD step, standard ops).

``train_step.onnx`` has the signature
``(params..., x, y, lr, mu, anchor.<param>...) -> (loss, new.<param>...)``:
one step of ``w' = w - lr * (grad CE(w) + mu * (w - anchor))``, i.e. SGD on the mean
cross-entropy plus the FedProx term mu/2 ||w - w0||^2 (Li et al. 2020, "Federated
Optimization in Heterogeneous Networks"); mu = 0 is FedAvg. It runs in stock
onnxruntime (no onnxruntime-training): the step is written with ``torch.autograd.grad``,
traced to forward ops with ``make_fx`` and the decompositions of ``export.onnx_decomp``,
then translated with ``torch.onnx.export(..., dynamo=True)``. Exporting a module that
calls ``autograd.grad`` directly fails, hence the ``make_fx`` detour.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fedfleet.export.bn_decomp import min_batch
from fedfleet.export.manifest import TRAIN_STEP_ONNX, UnsupportedExport, train_step_signature
from fedfleet.export.models import trainable_names
from fedfleet.export.onnx_decomp import training_decompositions
from fedfleet.export.state_outputs import (
    STATE_TOLERANCE,
    StateChannel,
    example_state,
    inference_state_names,
    program_state_names,
    state_error,
    stateful_copy,
)
from fedfleet.export.task_loss import LossFn, cross_entropy

STANDARD_DOMAINS = ("", "ai.onnx")  # what onnxruntime-web and every other runtime implements
MIN_OPSET = 17
STEP_TOLERANCE = 1e-5  # one step against eager, relative to the larger of 1 and each tensor's magnitude


def export_inference_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> int:
    """Write ``x [batch, C, H, W] -> logits`` and return its opset.

    The trainable weights are initializers *and* graph inputs, i.e. defaults a caller may
    override: a phone evaluates its current weights without rebuilding the session.
    """
    model = copy.deepcopy(model).eval()
    x = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    try:
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
            # The graph optimizer folds batch norm into the layer before it, and its trainable weights
            # with it: they could no longer be fed. Kept as they are, they stay named initializers.
            optimize=not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        )
    except Exception as exc:
        raise UnsupportedExport.from_exception("ONNX inference export", exc) from exc
    assert program is not None  # dynamo=True always returns an ONNXProgram
    proto = program.model_proto
    _expose_initializers(proto, trainable_names(model))
    _expose_initializers(proto, inference_state_names(program_state_names(model)))  # a phone feeds its own
    return _check_and_save(proto, path)


def export_train_step_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path,
                           loss_fn: LossFn | None = None) -> int:
    """Write ``train_step.onnx`` for a dynamic batch and return its opset; ``loss_fn``: the task's own
    (export/task_loss.py), traced into the step; None: mean cross-entropy."""
    task_loss = loss_fn or cross_entropy
    source = model
    # batch statistics, dropout as the identity (export.bn_decomp); running statistics in and out
    # through the channel (export.state_outputs)
    model, channel = stateful_copy(source)
    names = trainable_names(model)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters() if p.requires_grad]
    k = len(names)

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, (x, y, lr, mu), anchors, state = args[:k], args[k : k + 4], args[k + 4 : 2 * k + 4], args[2 * k + 4 :]
        channel.load(state)
        # frozen parameters and buffers are read from the model: constants of the graph
        logits = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (x,))
        loss = task_loss(logits, y)
        grads = torch.autograd.grad(loss, weights)
        new = [w - lr * (g + mu * (w - a)) for w, g, a in zip(weights, grads, anchors, strict=True)]
        return (loss.detach(), *new, *[t.detach() for t in channel.collect()])

    batch = _distinct_batch(params, input_shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *input_shape), generator=gen)
    y = torch.zeros(batch, dtype=torch.int64)
    scalars = (torch.tensor(0.1), torch.tensor(0.0))  # lr, mu
    state = example_state(source, channel.names)
    args = (*params, x, y, *scalars, *[p.detach().clone() for p in params], *state)
    dyn = {0: torch.export.Dim("batch")}
    input_names, output_names = train_step_signature(names, channel.names)
    try:
        # frozen weights are real tensors captured by the closure, hence _allow_non_fake_inputs
        graph = make_fx(
            step,
            decomposition_table=training_decompositions(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(*args)
        program = torch.onnx.export(
            graph,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=(*[None] * k, dyn, dyn, None, None, *[None] * k, *[None] * len(state)),
            verbose=False,
        )
    except UnsupportedExport:
        raise
    except Exception as exc:
        raise UnsupportedExport.from_exception("ONNX train-step export", exc) from exc
    assert program is not None  # dynamo=True always returns an ONNXProgram
    opset = _check_and_save(program.model_proto, path)
    problem = _self_check_step(path, model, names, input_shape, source, channel, task_loss)
    if problem is not None:
        path.unlink(missing_ok=True)
        raise UnsupportedExport(TRAIN_STEP_ONNX, problem)
    return opset


def _self_check_step(path: Path, model: nn.Module, names: list[str], input_shape: tuple[int, ...],
                     source: nn.Module, channel: StateChannel, task_loss: LossFn = cross_entropy) -> str | None:
    """Describe any disagreement of one step in ONNX Runtime with the same step in eager PyTorch
    (loss, new parameters and running statistics, from changed weights and statistics, at a few batch
    sizes), else None. ``model`` is ``source``'s copy that reads ``channel``."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    trainable = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    # Batch norm from 4 examples on, as model.pte's check (executorch_export._self_check): over two its
    # backward amplifies float32 rounding past the tolerance.
    smallest = 2 if min_batch(source) == 1 else 4
    for batch in (smallest, 5, smallest):
        weights = [(trainable[n] + 0.1 * torch.randn(trainable[n].shape, generator=gen)).detach() for n in names]
        x = torch.rand((batch, *input_shape), generator=gen)
        y = torch.randint(0, 2, (batch,), generator=gen)
        lr, mu = torch.tensor(0.1), torch.tensor(0.5)
        anchors = [w + 0.01 for w in weights]
        state = [t + 0.5 if t.is_floating_point() else t + 3 for t in example_state(source, channel.names)]
        channel.load(state)
        leaves = [w.clone().requires_grad_(True) for w in weights]
        loss = task_loss(torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,)), y)
        grads = torch.autograd.grad(loss, leaves)
        want = [loss.detach()] + [w - lr * (g + mu * (w - a)) for w, g, a in zip(weights, grads, anchors, strict=True)]
        feed = [*weights, x, y, lr, mu, *anchors, *state]
        try:
            got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), feed, strict=True)})
        except Exception as exc:  # onnxruntime raises its own exception types
            return f"batch {batch} does not run: {type(exc).__name__}: {exc}"[:800]
        err = max(float(np.abs(g - w.numpy()).max()) / max(1.0, float(w.abs().max()))
                  for g, w in zip(got, want, strict=False))  # the state outputs follow
        if err > STEP_TOLERANCE:
            return f"batch {batch}: loss/new parameters differ from eager by {err:.2e} (relative)"
        err = state_error([torch.from_numpy(g) for g in got[len(want):]], source, x, state, channel.names,
                          dict(zip(names, weights, strict=True)))
        if err > STATE_TOLERANCE:
            return f"batch {batch}: running statistics differ from eager by {err:.2e} (relative)"
    return None


def _distinct_batch(params: list[torch.Tensor], input_shape: tuple[int, ...]) -> int:
    """An example batch size equal to no other input dimension.

    Symbolic ``make_fx`` gives equal input sizes one symbol ("duck sizing"); a batch of 16
    next to a 16-channel weight would tie the batch to the weight's shape in the graph.
    """
    taken = {d for p in params for d in p.shape} | set(input_shape)
    return next(b for b in range(2, 1 << 16) if b not in taken)


def _expose_initializers(proto: onnx.ModelProto, names: list[str]) -> None:
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise UnsupportedExport(
            "model.onnx", f"trainable weights {missing} were not kept as named initializers"
        )
    for name in names:
        dims = list(inits[name].dims)
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))


def _check_and_save(proto: onnx.ModelProto, path: Path) -> int:
    """Refuse graphs that stock runtimes (and onnxruntime-web) cannot run; save; return the opset."""
    opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
    if opset < MIN_OPSET:
        raise UnsupportedExport("opset", f"opset {opset} < {MIN_OPSET}")
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS}
    )
    if custom or proto.functions:
        raise UnsupportedExport(custom[0] if custom else "onnx function", "graph needs non-standard ONNX ops")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return opset
