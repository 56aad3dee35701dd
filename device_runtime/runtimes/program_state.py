"""The running statistics an exported training program carries from step to step (export/state_outputs.py).

``model.pte`` and ``train_step.onnx`` of a model with batch norm take ``state.<buffer>`` inputs and
return ``new_state.<buffer>`` outputs; the runtime holds the values between steps, starts a task from
the state it is given (the server's, or the phone's own under ``--local-state``) and reports the state
the task ends with, as the eager runtime does. A buffer a given state lacks starts from the bundle's
initial value (its weights.safetensors, the model the programs were exported from). No torch here: the
ONNX Runtime phone does not import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedfleet.export.manifest import STATE_IN, WEIGHTS, BundleError, Manifest


def signature_state(inputs: Sequence[str]) -> list[str]:
    """The running statistics a program's input names carry, in call order."""
    return [n.removeprefix(STATE_IN) for n in inputs if n.startswith(STATE_IN)]


class ProgramState:
    def __init__(self, initial: Mapping[str, np.ndarray]) -> None:
        self.names = list(initial)
        self._initial = {n: np.array(v, copy=True) for n, v in initial.items()}
        self._values = {n: v.copy() for n, v in self._initial.items()}

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest: Manifest, artifact: str) -> ProgramState:
        """The state ``artifact``'s signature names, started from the bundle's weights file."""
        names = signature_state(manifest.signatures.get(artifact, {}).get("inputs", []))
        if not names:
            return cls({})
        from safetensors.numpy import load_file  # safetensors: nothing a phone loads is unpickled

        path = Path(bundle_dir) / WEIGHTS
        if not path.is_file():
            raise BundleError(f"{artifact} carries running statistics but the bundle has no {WEIGHTS}")
        weights = load_file(str(path))
        missing = [n for n in names if n not in weights]
        if missing:
            raise BundleError(f"{WEIGHTS} has no running statistics {missing[:3]} that {artifact} carries")
        return cls({n: weights[n] for n in names})

    def get(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._values.items()}

    def set(self, state: Mapping[str, np.ndarray]) -> None:
        """Load ``state``; a buffer it lacks goes back to its initial value."""
        self._values = {n: np.array(state.get(n, init), dtype=init.dtype).reshape(init.shape)
                        for n, init in self._initial.items()}

    def values(self) -> list[np.ndarray]:
        """The program's state inputs, in call order."""
        return [self._values[n] for n in self.names]

    def update(self, outputs: Sequence[np.ndarray]) -> None:
        """Take the program's state outputs (call order) as the current state."""
        self._values = {n: np.array(v, dtype=self._initial[n].dtype).reshape(self._initial[n].shape)
                        for n, v in zip(self.names, outputs, strict=True)}
