"""Where a ``--local-state`` (FedBN) server keeps the state it evaluates with, across restarts.

With ``--local-state`` a version's stored message is what phones download: the parameters only. The
merged state (batch norm statistics, server/model_state.py) the server evaluates with goes into the
store's meta under ``KEPT_STATE``, in the same transaction as its version, as a wire message (base64:
meta values are text). A restart puts it back beside the parameters, so the restarted server
evaluates, writes its final weights and checks uploads with the state it held before.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np

from fedfleet.protocol import decode_message, encode_message
from fedfleet.protocol.state import split_state, with_state

KEPT_STATE = "local_model_state"  # meta key


def kept_state_meta(local_state: bool, state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The meta entry a version's commit carries: empty when the version's message ships the state."""
    if not local_state or not state:
        return {}
    return {KEPT_STATE: base64.b64encode(encode_message("model", {"state": True}, state)).decode("ascii")}


def restore_state(tensors: Mapping[str, np.ndarray], kept: str | None) -> dict[str, np.ndarray]:
    """A stored version's tensors with the kept state added when the message shipped none."""
    params, state = split_state(tensors)
    if state or kept is None:
        return dict(tensors)
    return with_state(params, decode_message(base64.b64decode(kept)).tensors)
