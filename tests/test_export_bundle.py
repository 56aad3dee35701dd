"""Bundle reading, verification, packing and serving, on a small hand-made bundle.

The artifacts here are opaque bytes (ONNX graphs are marked unavailable, so nothing parses
them); tests/test_export_parity.py covers real exported bundles and the runtimes' checks.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from fedfleet.device_runtime.runtimes.loader import load_runtime
from fedfleet.export.bundle import (
    artifact_info,
    bundle_file,
    content_type,
    load_manifest,
    pack_bundle,
    unpack_bundle,
    verify_bundle,
    verify_file_bytes,
    write_manifest,
)
from fedfleet.export.manifest import (
    MANIFEST,
    MODEL_ONNX,
    MODEL_PTE,
    TRAIN_STEP_ONNX,
    ArtifactInfo,
    ArtifactUnavailable,
    BundleError,
    HashMismatch,
    MalformedManifest,
    Manifest,
    MissingFile,
    ParameterMismatch,
    ParamSpec,
    UnknownBundleFile,
    UnknownFormatVersion,
)

PTE_BYTES = b"\x00not-a-real-program\x01" * 10


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / MODEL_PTE).write_bytes(PTE_BYTES)
    unavailable = ArtifactInfo(
        available=False, op="aten.convolution_backward", reason="test: grouped convolution"
    )
    manifest = Manifest(
        model="mlp",
        dataset="digits",
        input_shape=(1, 8, 8),
        num_classes=10,
        seed=0,
        parameters=(
            ParamSpec("fc1.weight", (32, 64), "float32", True),
            ParamSpec("fc1.bias", (32,), "float32", True),
        ),
        max_batch=64,
        hyperparameters={"lr": 0.05, "batch_size": 16},
        artifacts={
            MODEL_PTE: artifact_info(tmp_path / MODEL_PTE),
            MODEL_ONNX: unavailable,
            TRAIN_STEP_ONNX: unavailable,
        },
        versions={"torch": "test"},
    )
    write_manifest(tmp_path, manifest)
    return tmp_path


def edit(bundle: Path, **changes: object) -> None:
    doc = json.loads((bundle / MANIFEST).read_text())
    doc.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(doc))


def test_manifest_round_trips_through_json(bundle: Path) -> None:
    manifest = verify_bundle(bundle)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.trainable_names() == ["fc1.weight", "fc1.bias"]
    assert manifest.artifacts[MODEL_PTE].size == len(PTE_BYTES)
    hyper = json.loads((bundle / MANIFEST).read_text())["hyperparameters"]
    assert hyper == {"lr": 0.05, "batch_size": 16} and type(hyper["batch_size"]) is int  # written "16", not "16.0"
    assert type(manifest.hyperparameters["batch_size"]) is int


@pytest.mark.parametrize("value", (True, "16", None))
def test_a_hyperparameter_that_is_not_a_number_is_refused(bundle: Path, value: object) -> None:
    edit(bundle, hyperparameters={"lr": 0.05, "batch_size": value})
    with pytest.raises(MalformedManifest):
        load_manifest(bundle)


def test_missing_artifact_and_missing_manifest(bundle: Path) -> None:
    (bundle / MODEL_PTE).unlink()
    with pytest.raises(MissingFile):
        verify_bundle(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(MissingFile):
        load_manifest(bundle)


def test_hash_mismatch(bundle: Path) -> None:
    (bundle / MODEL_PTE).write_bytes(PTE_BYTES[:-1] + b"\x02")
    with pytest.raises(HashMismatch):
        verify_bundle(bundle)


@pytest.mark.parametrize("version", (0, 2, "1", None))
def test_unknown_format_version(bundle: Path, version: object) -> None:
    edit(bundle, format_version=version)
    with pytest.raises(UnknownFormatVersion):
        load_manifest(bundle)


@pytest.mark.parametrize("text", ("{not json", "[]", '{"format_version": 1}'))
def test_malformed_manifest(bundle: Path, text: str) -> None:
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(MalformedManifest):
        load_manifest(bundle)


def test_unavailable_artifact_names_op_and_reason(bundle: Path) -> None:
    with pytest.raises(ArtifactUnavailable, match="aten.convolution_backward.*grouped"):
        load_runtime("onnx", bundle)
    with pytest.raises(ArtifactUnavailable):
        bundle_file(bundle, TRAIN_STEP_ONNX)


def test_phone_checks_each_download(bundle: Path) -> None:
    verify_file_bytes(load_manifest(bundle), MODEL_PTE, PTE_BYTES)
    with pytest.raises(HashMismatch):
        verify_file_bytes(load_manifest(bundle), MODEL_PTE, PTE_BYTES + b"!")


@pytest.mark.parametrize("name", ("../manifest.json", "/etc/passwd", "model.pt", "", "manifest.json/.."))
def test_serving_only_resolves_bundle_files(bundle: Path, name: str) -> None:
    with pytest.raises(UnknownBundleFile):
        bundle_file(bundle, name)


def test_serving_resolves_bundle_files(bundle: Path) -> None:
    assert bundle_file(bundle, MODEL_PTE).read_bytes() == PTE_BYTES
    assert bundle_file(bundle, MANIFEST) == bundle / MANIFEST
    assert content_type(MANIFEST) == "application/json"


def test_pack_unpack_round_trip_is_deterministic(
    bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    packed = pack_bundle(bundle)
    assert pack_bundle(bundle) == packed
    dest = tmp_path_factory.mktemp("unpacked")
    assert unpack_bundle(packed, dest) == load_manifest(bundle)
    assert (dest / MODEL_PTE).read_bytes() == PTE_BYTES


def test_unpack_rejects_foreign_names_and_tampering(bundle: Path, tmp_path: Path) -> None:
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", b"x")
    with pytest.raises(UnknownBundleFile):
        unpack_bundle(evil.getvalue(), tmp_path / "a")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(BundleError):
        unpack_bundle(b"not a zip", tmp_path / "b")
    packed = pack_bundle(bundle).replace(PTE_BYTES, PTE_BYTES[::-1])  # stored entries: bytes appear verbatim
    with pytest.raises(BundleError):  # the zip CRC catches it before the sha256 does
        unpack_bundle(packed, tmp_path / "c")


def test_torch_reference_needs_the_exported_backbone(
    bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = tmp_path_factory.mktemp("weights") / "backbone.pt"
    weights.write_bytes(b"the backbone the bundle was exported with")
    edit(bundle, backbone_weights_sha256="0" * 64)
    with pytest.raises(BundleError, match="backbone"):
        load_runtime("torch", bundle)
    with pytest.raises(ParameterMismatch):
        load_runtime("torch", bundle, backbone_weights=weights)
