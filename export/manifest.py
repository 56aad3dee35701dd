"""The bundle manifest (``manifest.json``): what a phone checks before it trains.

A manifest names the model, its input spec, every parameter in a fixed order, the
optimizer, the sha256 of each artifact, the versions of the tools that produced it, and
for an artifact that could not be produced, the op and the reason. Parsing validates the
whole document and raises a named ``BundleError`` subclass, so callers never see a
``KeyError`` from a malformed file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1

MODEL_PTE = "model.pte"  # ExecuTorch training program: forward(x, y[, state...]) -> (loss, logits[, new state...]) + grads
MODEL_ONNX = "model.onnx"  # ONNX inference graph: x -> logits (trainable weights overridable)
TRAIN_STEP_ONNX = "train_step.onnx"  # ONNX SGD step, signature below
WEIGHTS = "weights.safetensors"  # the model's state_dict the graphs were made from (fedfleet export --weights)
MANIFEST = "manifest.json"
ARTIFACT_FILES = (MODEL_PTE, MODEL_ONNX, TRAIN_STEP_ONNX, WEIGHTS)
BUNDLE_FILES = (*ARTIFACT_FILES, MANIFEST)

# train_step.onnx signature: (params..., x, y, lr, mu, anchor.<param>...) -> (loss, new.<param>...)
STEP_INPUTS = ("x", "y", "lr", "mu")
ANCHOR_PREFIX = "anchor."  # FedProx anchor w0 for each trainable parameter
NEW_PREFIX = "new."  # updated parameter outputs
PTE_PREFIX = "model."  # model.pte parameter FQNs are the plain names under the loss wrapper's "model"
# A model with batch norm statistics (export/state_outputs.py): both training programs also take
# state.<buffer>... last and return new_state.<buffer>... last.
STATE_IN = "state."
STATE_OUT = "new_state."


def train_step_signature(names: list[str], state: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Input and output names of train_step.onnx for trainable parameters ``names`` (and running
    statistics ``state``)."""
    return [*names, *STEP_INPUTS, *[ANCHOR_PREFIX + n for n in names], *[STATE_IN + n for n in state]], [
        "loss",
        *[NEW_PREFIX + n for n in names],
        *[STATE_OUT + n for n in state],
    ]


class BundleError(Exception):
    """A bundle cannot be used; raised at load time, before any training."""


class MissingFile(BundleError):
    pass


class HashMismatch(BundleError):
    pass


class UnknownFormatVersion(BundleError):
    pass


class ParameterMismatch(BundleError):
    """An artifact's parameter names/shapes/dtypes disagree with the manifest."""


class MalformedManifest(BundleError):
    pass


class ArtifactUnavailable(BundleError):
    """The exporter could not produce this artifact for this model (see ``op``/``reason``)."""


class UnknownBundleFile(BundleError):
    """A file name that is not part of a bundle (the server answers 404)."""


class UnsupportedExport(Exception):
    """Export-time: an artifact cannot be produced for this model; recorded in the manifest."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.reason = reason

    @staticmethod
    def from_exception(stage: str, exc: BaseException) -> UnsupportedExport:
        """Name the first ``aten`` op in an exporter's error message (best effort) and keep the message."""
        match = re.search(r"aten[.:]+\w+(\.\w+)?", str(exc))
        op = match.group(0) if match else type(exc).__name__
        return UnsupportedExport(op, f"{stage} failed: {type(exc).__name__}: {exc}"[:800])


@dataclass(frozen=True)
class ParamSpec:
    name: str  # plain model name, e.g. "fc1.weight" (= export.models.trainable_names order)
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name; always "float32" today
    trainable: bool


@dataclass(frozen=True)
class ArtifactInfo:
    available: bool
    sha256: str | None = None
    size: int | None = None
    op: str | None = None  # when unavailable: the op that could not be exported
    reason: str | None = None
    backend: str | None = None  # model.pte: "xnnpack" or "portable" (and why XNNPACK was not kept)


@dataclass(frozen=True)
class Manifest:
    model: str
    dataset: str
    input_shape: tuple[int, ...]  # one example: C, H, W (images), T, F (sequences), F (features)
    num_classes: int
    seed: int  # export.models.build_model seed: the torch reference rebuilds the same weights
    parameters: tuple[ParamSpec, ...]  # every parameter, model.named_parameters() order
    max_batch: int  # largest batch model.pte accepts (ExecuTorch plans memory for it)
    hyperparameters: dict[str, int | float]  # defaults for a task: lr (float), batch_size (int)
    artifacts: dict[str, ArtifactInfo]
    versions: dict[str, str]  # torch, executorch, onnx, onnxruntime, onnxscript
    backbone_weights_sha256: str | None = None
    optimizer: str = "sgd"
    onnx_opset: int | None = None
    format_version: int = FORMAT_VERSION
    inputs: dict[str, Any] = field(default_factory=dict)  # x/y dtype and shape, "batch" = dynamic
    # per artifact: {"inputs": [...], "outputs": [...]} in call order (ONNX names / pte method I/O)
    signatures: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    model_fingerprint: str | None = None  # export.task_model.model_fingerprint: names, shapes, dtypes

    def trainable(self) -> list[ParamSpec]:
        return [p for p in self.parameters if p.trainable]

    def trainable_names(self) -> list[str]:
        return [p.name for p in self.trainable()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> Manifest:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedManifest(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise MalformedManifest("manifest must be a JSON object")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:  # checked first: a newer layout may differ in every other field
            raise UnknownFormatVersion(
                f"bundle format_version {version!r}; this build reads {FORMAT_VERSION}"
            )
        try:
            return _parse(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedManifest(f"manifest field missing or of the wrong type: {exc!r}") from exc


def _parse(doc: dict[str, Any]) -> Manifest:
    shape = tuple(int(v) for v in doc["input_shape"])
    params = tuple(
        ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p["dtype"]), bool(p["trainable"]))
        for p in doc["parameters"]
    )
    artifacts = {str(k): ArtifactInfo(**v) for k, v in doc["artifacts"].items()}
    unknown = set(artifacts) - set(ARTIFACT_FILES)
    if unknown:
        raise ValueError(f"unknown artifacts {sorted(unknown)}")
    return Manifest(
        model=str(doc["model"]),
        dataset=str(doc["dataset"]),
        input_shape=shape,
        num_classes=int(doc["num_classes"]),
        seed=int(doc["seed"]),
        parameters=params,
        max_batch=int(doc["max_batch"]),
        hyperparameters={str(k): _number(v) for k, v in doc["hyperparameters"].items()},
        artifacts=artifacts,
        versions={str(k): str(v) for k, v in doc["versions"].items()},
        backbone_weights_sha256=doc.get("backbone_weights_sha256"),
        optimizer=str(doc["optimizer"]),
        onnx_opset=None if doc.get("onnx_opset") is None else int(doc["onnx_opset"]),
        format_version=int(doc["format_version"]),
        inputs=dict(doc.get("inputs", {})),
        signatures={
            str(k): {str(io): [str(n) for n in names] for io, names in v.items()}
            for k, v in doc.get("signatures", {}).items()
        },
        model_fingerprint=None if doc.get("model_fingerprint") is None else str(doc["model_fingerprint"]),
    )


def _number(value: Any) -> int | float:
    """A hyperparameter as JSON holds it: an integer stays one (batch_size), anything else is a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"hyperparameter {value!r} is not a number")
    return value if isinstance(value, int) else float(value)
