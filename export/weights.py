"""Model weights as files: safetensors (written by every run, read anywhere) or, for a user's
``--init-weights`` on the server only, a torch file loaded with ``weights_only=True``. Phones read
safetensors only: nothing they receive or load is unpickled."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn


def load_weights(path: str | Path, flag: str, allow_torch: bool = True) -> dict[str, np.ndarray]:
    """A ``{name: array}`` state dict from a safetensors file, or (``allow_torch``) from a torch file of
    tensors loaded with ``weights_only=True``. ValueError naming ``flag`` for anything else."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, OSError) as exc:
        if not allow_torch:
            raise ValueError(f"{flag} {path}: not a safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (the user's file: any failure to read it is theirs)
        raise ValueError(f"{flag} {path}: neither safetensors nor a torch state_dict loadable with "
                         f"weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path}: a torch file must hold a state_dict (names to tensors), "
                         f"got {type(state).__name__}")
    return {str(k): v.detach().cpu().numpy() for k, v in state.items()}


def fit_weights(model: nn.Module, weights: Mapping[str, np.ndarray], flag: str) -> None:
    """Load ``weights`` into ``model``: every parameter must be there with the model's shape; buffers
    (e.g. batch-norm statistics) may be left out; a name the model lacks is refused. ValueError
    naming ``flag`` and the first few differences otherwise."""
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    problems = [f"{n} missing" for n in state if n in params and n not in weights]
    problems += [f"{n} is not in the model" for n in weights if n not in state]
    problems += [f"{n} has shape {list(np.shape(weights[n]))}, the model's is {list(state[n].shape)}"
                 for n in state if n in weights and tuple(np.shape(weights[n])) != tuple(state[n].shape)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{flag}: the weights do not fit the model: {'; '.join(problems[:3])}{more}")
    with torch.no_grad():
        for name, value in state.items():
            if name in weights:
                value.copy_(torch.from_numpy(np.asarray(weights[name])).to(value.dtype))


def save_weights(path: str | Path, model: nn.Module) -> Path:
    """``model.state_dict()`` as safetensors at ``path`` (written whole, then renamed into place)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {n: t.detach().cpu().contiguous().numpy() for n, t in model.state_dict().items()}  # 0-d stays 0-d
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp))
    tmp.replace(path)
    return path
