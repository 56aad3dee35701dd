"""Training runtimes: one small interface, one implementation per backend in its own file.

Backend-specific (experimental) imports stay inside each backend's module, which is only
imported when that backend is asked for.
"""

from __future__ import annotations

from fedfleet.device_runtime.runtimes.base import (
    EvalResult,
    TrainConfig,
    TrainingRuntime,
    TrainResult,
    iterate_batches,
)

RUNTIME_NAMES = ("torch", "executorch", "onnx")

__all__ = [
    "RUNTIME_NAMES",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "TrainingRuntime",
    "iterate_batches",
]
