"""bench/flower_side.py's MLP (the Flower half of bench_flower.py, which runs in Flower's own
virtualenv and imports nothing of fedfleet) is fedfleet's: the same parameter names and shapes,
and from the same weights the same outputs. Flower is not installed here, so only the torch model
part of flower_side.py is loaded: its imports of torch and its MLP class, from the file's syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.export.models import ModelSpec, build_model

FLOWER_SIDE = Path(__file__).resolve().parent.parent / "bench" / "flower_side.py"


def _flower_mlp_class() -> Any:
    tree = ast.parse(FLOWER_SIDE.read_text(), str(FLOWER_SIDE))
    keep: list[ast.stmt] = [node for node in tree.body
            if (isinstance(node, ast.ClassDef) and node.name == "MLP")
            or (isinstance(node, ast.ImportFrom) and node.module in ("__future__", "torch"))
            or (isinstance(node, ast.Import) and [a.name for a in node.names] == ["torch"])]
    assert any(isinstance(node, ast.ClassDef) for node in keep), "flower_side.py has no class MLP"
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(FLOWER_SIDE), "exec"), namespace)  # noqa: S102
    return namespace["MLP"]


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
