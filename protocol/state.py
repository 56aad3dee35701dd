"""A model's non-trainable state on the wire (protocol/FORMAT.md section 11).

State tensors (batch-norm running statistics and counters) travel beside the parameters in the
same message, named ``"state:" + <buffer name>``, dense, as absolute values: never clipped,
noised, sparsified or quantized. A dict that mixes both is split here, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

STATE_PREFIX = "state:"

T = TypeVar("T")


def is_state(name: str) -> bool:
    return name.startswith(STATE_PREFIX)


def split_state(tensors: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """(parameters, state): the state keyed by buffer name, without the prefix."""
    params = {n: t for n, t in tensors.items() if not n.startswith(STATE_PREFIX)}
    state = {n[len(STATE_PREFIX):]: t for n, t in tensors.items() if n.startswith(STATE_PREFIX)}
    return params, state


def with_state(params: Mapping[str, T], state: Mapping[str, T]) -> dict[str, T]:
    """Parameters plus the state under prefixed names: one message's tensors."""
    return {**params, **{STATE_PREFIX + n: t for n, t in state.items()}}
