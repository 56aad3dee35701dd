"""bench/flower_side.py's models (the Flower half of bench_flower.py, which runs in Flower's own
virtualenv and imports nothing of fedfleet) is fedfleet's: the same parameter names and shapes,
and from the same weights the same outputs. Flower is not installed here, so only the torch model
part of flower_side.py is loaded: its imports of torch and its MLP class, from the file's syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedfleet.export.models import ModelSpec, build_model
from fedfleet.export.task_model import task_model

FLOWER_SIDE = Path(__file__).resolve().parent.parent / "bench" / "flower_side.py"


def _flower_side(*names: str) -> dict[str, Any]:
    """flower_side.py's classes and functions ``names``, with its numpy and torch imports."""
    tree = ast.parse(FLOWER_SIDE.read_text(), str(FLOWER_SIDE))
    keep: list[ast.stmt] = [node for node in tree.body
            if (isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name in names)
            or (isinstance(node, ast.ImportFrom) and node.module in ("__future__", "torch"))
            or (isinstance(node, ast.Import) and [a.name for a in node.names] in (["torch"], ["numpy"]))]
    found = {node.name for node in keep if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    assert found == set(names), f"flower_side.py lacks {set(names) - found}"
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(FLOWER_SIDE), "exec"), namespace)  # noqa: S102
    return namespace


def _flower_mlp_class() -> Any:
    return _flower_side("MLP")["MLP"]


def test_flower_sides_mlp_computes_what_fedfleets_does() -> None:
    ours = build_model(ModelSpec("mlp", (1, 8, 8), 10), seed=3)
    state = ours.state_dict()
    # As flower_side.model() builds it from the .npz bench_flower.py writes from fedfleet's model.
    theirs = _flower_mlp_class()(64, 10, int(state["fc1.weight"].shape[0]))
    assert {n: tuple(t.shape) for n, t in theirs.state_dict().items()} == {n: tuple(t.shape) for n, t in state.items()}
    theirs.load_state_dict(state, strict=True)
    x = torch.from_numpy(np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
    # And one SGD step from there lands on the same weights (the same graph, the same gradients).
    for model in (ours, theirs):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(16) % 10)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad  # type: ignore[operator]
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value), name


@pytest.mark.parametrize(("ours_name", "peer_name", "shape"), [
    ("mlp", "mlp", (1, 8, 8)),
    ("cnn", "cnn", (1, 28, 28)),
    ("bench.transfer_task:frozen_cnn", "cnn-frozen", (1, 28, 28)),
    ("mobilenet", "mobilenet", (1, 28, 28)),
])
def test_flower_sides_models_built_from_the_npz_are_fedfleets(ours_name: str, peer_name: str,
                                                               shape: tuple[int, ...]) -> None:
    """flower_side.build_net from what bench_flower.write_npz stores (the peer's model name and every
    tensor of fedfleet's initial state) loads strictly, trains the same parameters (a frozen backbone
    stays frozen on both sides) and computes the same outputs and gradients."""
    ours = task_model(ours_name, shape, 10, 3, None)
    side = _flower_side("MLP", "CNN", "TransferMobileNet", "build_net", "trainable")
    rng = np.random.default_rng(0)
    d: dict[str, Any] = {f"state:{n}": t.detach().numpy() for n, t in ours.state_dict().items()}
    d.update(model=np.str_(peer_name), x_train=rng.random((4, *shape), dtype=np.float32), num_classes=np.int64(10))
    theirs = side["build_net"](d)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert list(side["trainable"](theirs)) == trained
    x = torch.from_numpy(rng.random((8, *shape), dtype=np.float32))
    for model in (ours, theirs):
        model.train()
        torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 10).backward()
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), ours.eval()(x))
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad is None) == (grads[name].grad is None), name
        if p.grad is not None:
            assert torch.equal(grads[name].grad, p.grad), name
