"""A bundle directory: ``model.pte``, ``model.onnx``, ``train_step.onnx`` and ``manifest.json``.

Reading is check-at-the-boundary: ``verify_bundle`` raises a named ``BundleError``
(missing file, hash mismatch, unknown format version, parameter mismatch) before any
runtime is built. Serving helpers give the server one file per name
(``GET /v1/bundle/{filename}``) and let a phone check each download against the
manifest's sha256. This module imports neither ExecuTorch nor ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from fedfleet.export.manifest import (
    ARTIFACT_FILES,
    BUNDLE_FILES,
    MANIFEST,
    MODEL_ONNX,
    TRAIN_STEP_ONNX,
    ArtifactInfo,
    ArtifactUnavailable,
    BundleError,
    HashMismatch,
    Manifest,
    MissingFile,
    ParameterMismatch,
    UnknownBundleFile,
    train_step_signature,
)

CONTENT_TYPES = {
    "model.pte": "application/octet-stream",
    "model.onnx": "application/octet-stream",
    "train_step.onnx": "application/octet-stream",
    "weights.safetensors": "application/octet-stream",
    "manifest.json": "application/json",
}
MAX_BUNDLE_FILE_BYTES = 512 * 1024 * 1024  # refuse to unpack anything larger (zip bombs)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_info(path: Path) -> ArtifactInfo:
    """Describe a file that was written: available, with its hash and size."""
    return ArtifactInfo(available=True, sha256=sha256_file(path), size=path.stat().st_size)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


def load_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json``; does not look at the artifacts (see ``verify_bundle``)."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise MissingFile(f"{path} does not exist")
    return Manifest.from_json(path.read_text(encoding="utf-8"))


def verify_bundle(bundle_dir: Path) -> Manifest:
    """Check the manifest, every available artifact's sha256, and the ONNX graphs' parameters.

    ``model.pte`` parameters are checked by the ExecuTorch runtime when it loads the
    program (reading them needs the ExecuTorch runtime itself).
    """
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    for name, info in manifest.artifacts.items():
        if info.available:
            verify_file_bytes(manifest, name, _read(bundle_dir / name))
    _check_onnx_params(bundle_dir, manifest)
    return manifest


def require_artifact(manifest: Manifest, filename: str) -> None:
    """Raise ``ArtifactUnavailable`` naming the op and reason if the exporter skipped ``filename``."""
    info = manifest.artifacts.get(filename)
    if info is None or not info.available:
        op = info.op if info else None
        reason = info.reason if info else "not listed in the manifest"
        raise ArtifactUnavailable(f"{filename} unavailable for model {manifest.model!r}: op={op}: {reason}")


def verify_file_bytes(manifest: Manifest, filename: str, data: bytes) -> None:
    """What a phone runs on each download: the bytes must hash to the manifest's sha256."""
    if filename not in ARTIFACT_FILES:
        raise UnknownBundleFile(f"{filename!r} is not a bundle artifact")
    require_artifact(manifest, filename)
    expected = manifest.artifacts[filename].sha256
    actual = sha256_bytes(data)
    if actual != expected:
        raise HashMismatch(f"{filename}: sha256 {actual} != manifest {expected}")


def bundle_file(bundle_dir: Path, filename: str) -> Path:
    """Resolve a requested name to a file of the bundle; anything else is ``UnknownBundleFile``.

    Only the fixed names in ``BUNDLE_FILES`` are served, so a request cannot walk out of
    the bundle directory.
    """
    if filename not in BUNDLE_FILES:
        raise UnknownBundleFile(f"{filename!r} is not a bundle file")
    path = Path(bundle_dir) / filename
    if filename != MANIFEST:
        require_artifact(load_manifest(bundle_dir), filename)
    if not path.is_file():
        raise MissingFile(f"{path} does not exist")
    return path


def content_type(filename: str) -> str:
    if filename not in CONTENT_TYPES:
        raise UnknownBundleFile(f"{filename!r} is not a bundle file")
    return CONTENT_TYPES[filename]


def pack_bundle(bundle_dir: Path) -> bytes:
    """The verified bundle as one zip archive (stored, not compressed: the graphs are dense floats)."""
    manifest = verify_bundle(bundle_dir)
    names = [MANIFEST] + [n for n, info in sorted(manifest.artifacts.items()) if info.available]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in names:
            # fixed timestamp so the same bundle always packs to the same bytes
            zf.writestr(
                zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), _read(Path(bundle_dir) / name)
            )
    return buf.getvalue()


def unpack_bundle(data: bytes, dest: Path) -> Manifest:
    """Write a packed bundle into ``dest`` and verify it; only the known file names are accepted."""
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"packed bundle is not a zip archive: {exc}") from exc
    with zf:
        infos = zf.infolist()
        for info in infos:
            if info.filename not in BUNDLE_FILES:
                raise UnknownBundleFile(f"packed bundle holds unexpected file {info.filename!r}")
            if info.file_size > MAX_BUNDLE_FILE_BYTES:
                raise BundleError(f"{info.filename} is {info.file_size} bytes, over the limit")
        dest.mkdir(parents=True, exist_ok=True)
        for info in infos:
            try:
                data = zf.read(info)
            except zipfile.BadZipFile as exc:  # CRC mismatch: damaged in transit
                raise BundleError(f"packed {info.filename} is damaged: {exc}") from exc
            (dest / info.filename).write_bytes(data)
    return verify_bundle(dest)


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise MissingFile(f"{path} does not exist")
    return path.read_bytes()


def _check_onnx_params(bundle_dir: Path, manifest: Manifest) -> None:
    """The ONNX graphs must carry the manifest's trainable parameters by name, shape and dtype."""
    import onnx  # the standard ONNX package (protobuf), not a runtime

    expected = {p.name: p.shape for p in manifest.trainable()}
    signed = {name: set(manifest.signatures.get(name, {}).get("inputs", [])) for name in (TRAIN_STEP_ONNX, MODEL_ONNX)}
    extras = {  # and the running statistics their signatures name (export/state_outputs.py)
        TRAIN_STEP_ONNX: set(train_step_signature(list(expected))[0]) | signed[TRAIN_STEP_ONNX],
        MODEL_ONNX: {"x"} | signed[MODEL_ONNX],
    }
    for name, allowed in extras.items():
        info = manifest.artifacts.get(name)
        if info is None or not info.available:
            continue
        graph = onnx.load(str(bundle_dir / name), load_external_data=False).graph
        inputs = {i.name: i for i in graph.input}
        unexpected = set(inputs) - set(expected) - allowed
        if unexpected:
            raise ParameterMismatch(f"{name} has inputs {sorted(unexpected)} that the manifest does not list")
        for pname, shape in expected.items():
            if pname not in inputs:
                raise ParameterMismatch(f"{name} has no input for parameter {pname!r}")
            tensor_type = inputs[pname].type.tensor_type
            dims = tuple(d.dim_value for d in tensor_type.shape.dim)
            if dims != shape or tensor_type.elem_type != onnx.TensorProto.FLOAT:
                raise ParameterMismatch(
                    f"{name}: {pname} is {dims} (elem_type {tensor_type.elem_type}), manifest says {shape} float32"
                )
