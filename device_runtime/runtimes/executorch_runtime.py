"""ExecuTorch backend: the ``model.pte`` training program of a bundle.

The program returns ``(loss, logits)``, then gradients, then the trainable parameters as
tensors that alias the program's own weights (ExecuTorch ``TrainingModule``). Each
``forward_backward`` recomputes gradients from scratch (they do not accumulate), and this
runtime applies SGD with the FedProx term in place on the aliased weights. A model with batch
norm also takes its running statistics after ``(x, y)`` and returns them updated after the
logits (``program_state``): held here between steps, reported as the eager runtime's are.

Evaluation runs the program's ``evaluate`` method (eval mode: batch norm with the running statistics
held here, dropout off), fed the current weights and statistics. A bundle whose manifest names no
such method evaluates with the training method's logits (batch statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedfleet.device_runtime.runtimes.base import (
    EvalResult,
    TrainConfig,
    TrainResult,
    iterate_batches,
    score_logits,
)
from fedfleet.device_runtime.runtimes.program_state import ProgramState
from fedfleet.export.manifest import MODEL_PTE, PTE_PREFIX, STATE_IN, Manifest, ParameterMismatch
from fedfleet.export.pte_evaluate import EVALUATE


def set_threads(count: int) -> None:
    """Size ExecuTorch's process-wide kernel threadpool (XNNPACK uses it); 1 emulates one phone core.

    Process-wide and not safe while another thread runs a program: call it at start-up.
    """
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )

    if _threadpool_get_thread_count() != count:
        _unsafe_reset_threadpool(count)


class ExecuTorchRuntime:
    name = "executorch"

    def __init__(self, program: bytes, manifest: Manifest, threads: int | None = 1,
                 state: ProgramState | None = None) -> None:
        """``threads`` sizes the process-wide kernel threadpool (see ``set_threads``); None leaves it.
        ``state``: the running statistics the program carries, with their initial values (none: a
        program without them)."""
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer

        if threads is not None:
            set_threads(threads)
        # The module reads the program from this buffer without copying it: keep it alive.
        self._program = program
        self._module = _load_for_executorch_for_training_from_buffer(self._program)
        self._manifest = manifest
        self._max_batch = manifest.max_batch
        self._state = state if state is not None else ProgramState({})
        # The parameter tensors are only handed out by a first forward_backward; run it on
        # a dummy batch (it changes no weight: the optimizer step is ours).
        self._module.forward_backward("forward", (torch.zeros(2, *manifest.input_shape), torch.zeros(2, dtype=torch.int64),
                                                  *self._state_inputs()))
        self._params = self._named(self._module.named_parameters())
        self._check_params()
        signature = manifest.signatures.get(MODEL_PTE, {})
        # the evaluation method's inputs after x: trainable weights, then running statistics
        self._eval_inputs = signature.get("evaluate_inputs", [])[1:]

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest: Manifest) -> ExecuTorchRuntime:
        return cls((Path(bundle_dir) / MODEL_PTE).read_bytes(), manifest,
                   state=ProgramState.from_bundle(bundle_dir, manifest, MODEL_PTE))

    def param_names(self) -> list[str]:
        return list(self._params)

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self._params.items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(torch.from_numpy(np.asarray(params[n], dtype=np.float32)).reshape(p.shape))

    def get_state(self) -> dict[str, np.ndarray]:
        """Batch norm running statistics; empty for a model without."""
        return self._state.get()

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load ``state``; a buffer it lacks goes back to the bundle's initial value."""
        self._state.set(state)

    def _state_inputs(self) -> list[torch.Tensor]:
        return [torch.from_numpy(v.copy()) for v in self._state.values()]

    def train(self, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> TrainResult:
        if cfg.batch_size > self._max_batch:
            raise ValueError(f"batch_size {cfg.batch_size} > max_batch {self._max_batch} of this model.pte")
        xt, yt = (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            torch.from_numpy(y.astype(np.int64)),
        )
        anchor = {n: p.clone() for n, p in self._params.items()} if cfg.prox_mu > 0 else {}
        total, steps = 0.0, 0
        with torch.no_grad():
            for idx in iterate_batches(len(x), cfg, rng):
                ti = torch.from_numpy(idx)
                outputs = self._module.forward_backward("forward", (xt[ti], yt[ti], *self._state_inputs()))
                total += float(outputs[0])
                if self._state.names:  # copied at once: the outputs live in the program's planned memory
                    self._state.update([t.numpy().copy() for t in outputs[2 : 2 + len(self._state.names)]])
                grads = self._named(self._module.named_gradients())
                for n, p in self._params.items():
                    g = grads[n]
                    if anchor:  # FedProx: d/dw mu/2 ||w - w0||^2 = mu (w - w0)
                        g = g + cfg.prox_mu * (p - anchor[n])
                    p.sub_(cfg.lr * g)
                steps += 1
        return TrainResult(loss=total / max(steps, 1), num_examples=len(x), steps=steps)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalResult:
        """Cross-entropy and accuracy of the evaluation method's logits (see the module docstring);
        the weights and the state do not change."""
        step = min(batch_size, self._max_batch)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), step):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + step], dtype=np.float32))
            yb = y[start : start + step].astype(np.int64)
            if self._eval_inputs:
                logits = self._module.model.run_method(EVALUATE, (xb, *self._eval_feed()))[0]
            else:
                logits = self._module.forward_backward("forward", (xb, torch.from_numpy(yb), *self._state_inputs()))[1]
            batch_loss, batch_correct = score_logits(logits.numpy(), yb)
            loss_sum += batch_loss
            correct += batch_correct
        n = max(len(x), 1)
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=len(x))

    def _eval_feed(self) -> list[torch.Tensor]:
        """The evaluation method's weights and statistics, in its input order."""
        state = self._state.get()
        return [self._params[n] if n in self._params else torch.from_numpy(state[n.removeprefix(STATE_IN)])
                for n in self._eval_inputs]

    @staticmethod
    def _named(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(PTE_PREFIX): v for k, v in tensors.items()}

    def _check_params(self) -> None:
        expected = {p.name: p.shape for p in self._manifest.trainable()}
        actual = {n: tuple(p.shape) for n, p in self._params.items()}
        if list(actual) != list(expected) or actual != expected:
            raise ParameterMismatch(f"model.pte parameters {actual} != manifest {expected}")
