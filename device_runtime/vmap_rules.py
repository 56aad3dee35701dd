"""Call an ``autograd.Function``'s own ``vmap`` rule directly, without functorch's generic dispatch.

Under ``torch.func.vmap`` a custom ``autograd.Function`` reaches its ``vmap`` staticmethod through
functorch's Python dispatcher (pytree flattening of every argument, signature binding, output identity
checks): about 0.3 ms per call, whatever the tensors' size. The batched trainer calls five such layers
per step (first convolution, two batch norms, two poolings), so on small models that overhead was a
third of a step (``bench/bench_batched.py``). ``apply`` does what that dispatcher does for the one
case the trainer has, positional tensor arguments under one vmap level: unwrap each argument at the
current level, run the rule with that level lowered (so the rule's own ``apply`` is an ordinary
autograd call), and wrap its outputs back. Anything else (no vmap, or another functorch transform
such as ``grad`` on top) takes the ordinary ``Function.apply`` path.

This uses functorch's internal wrapping calls (``torch._C._functorch``), which the ``torch`` pin in
constraints.txt fixes; ``tests/test_batched_ops.py`` checks every layer against eager in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._C import _functorch
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter


@dataclass(frozen=True)
class _Info:
    """The part of functorch's ``VmapInfo`` the rules read."""

    batch_size: int
    randomness: str = "error"


def apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)``; under vmap, through ``function.vmap`` without functorch's dispatcher."""
    level = _functorch.maybe_current_level()
    if level is None:
        return function.apply(*args)
    interpreter = retrieve_current_functorch_interpreter()
    if interpreter.key() != torch._C._functorch.TransformType.Vmap:
        return function.apply(*args)
    inner: list[Any] = []
    dims: list[int | None] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            value, dim = _functorch._unwrap_batched(arg, level)
            inner.append(value)
            dims.append(dim)
        else:
            inner.append(arg)
            dims.append(None)
    if all(d is None for d in dims):
        with interpreter.lower():
            return function.apply(*inner)
    with interpreter.lower():
        out, out_dims = function.vmap(_Info(interpreter.batch_size()), tuple(dims), *inner)  # type: ignore[attr-defined]
    if isinstance(out, tuple):
        return tuple(_wrap(o, d, level) for o, d in zip(out, out_dims, strict=True))
    return _wrap(out, out_dims, level)


def _wrap(value: Any, dim: int | None, level: int) -> Any:
    if dim is None or not isinstance(value, torch.Tensor):
        return value
    return _functorch._add_batch_dim(value, dim, level)
