"""``fedfleet export``: model + dataset shapes -> bundle directory.

``register`` adds the subcommand to the top-level parser in ``fedfleet/cli.py``;
``python -m fedfleet.export.cli ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedfleet.export.manifest import MANIFEST

if TYPE_CHECKING:
    from fedfleet.export.manifest import Manifest

# export.models.MODEL_NAMES, spelled out: importing export.models loads torch (~4 s), and every
# `fedfleet` command builds this parser, so a restarted `fedfleet serve` would wait for it.
MODEL_NAMES = ("mlp", "cnn", "mobilenet")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("export", help="export a model to an on-device bundle (ExecuTorch + ONNX)")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument(
        "--dataset", required=True, help="dataset whose input shape and classes the model takes"
    )
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="default task batch size, recorded in the manifest (default %(default)s, as the server's plan)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch model.pte accepts")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="default task learning rate, recorded in the manifest (default %(default)s, as the server's plan)")
    parser.add_argument("--backbone-weights", type=Path, default=None, help="MobileNetV3-small state dict")


def run(args: argparse.Namespace) -> int:
    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.export.build import ExportConfig, export_bundle

    data = load_dataset(args.dataset)
    cfg = ExportConfig(
        model=args.model,
        dataset=args.dataset,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        max_batch=args.max_batch,
        backbone_weights=args.backbone_weights,
    )
    start = time.perf_counter()
    manifest = export_bundle(cfg, args.out)
    failed = failures(manifest)
    if failed:  # one line, nothing claimed: the directory is left without a manifest or artifacts
        withdraw(args.out, manifest)
        print(f"fedfleet export: error: {'; '.join(failed)}", file=sys.stderr)
        return 2
    print(
        f"exported {cfg.model} for {cfg.dataset} {cfg.input_shape} -> {args.out} in {time.perf_counter() - start:.1f}s"
    )
    for name, info in sorted(manifest.artifacts.items()):
        status = (
            f"{info.size} bytes sha256 {info.sha256}"
            if info.available
            else f"UNAVAILABLE op={info.op}: {info.reason}"
        )
        print(f"  {name:16s} {status}")
    return 0


def failures(manifest: Manifest) -> list[str]:
    """"ARTIFACT: OP fails at STAGE" (or the reason a check gave) for each artifact the model could not
    be exported to."""
    out = []
    for name, info in sorted(manifest.artifacts.items()):
        if not info.available:
            reason = (info.reason or "").splitlines()[0] if info.reason else ""
            if " failed:" not in reason:  # a check of ours: its reason is the sentence
                out.append(f"{name}: {reason[:200]}")
                continue
            op = info.op if info.op and info.op != name else "the model"
            out.append(f"{name}: {op} fails at {reason.split(' failed:')[0][:200]}")
    return out


def withdraw(out_dir: Path, manifest: Manifest) -> None:
    """Remove the manifest and every artifact written beside it."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for name in manifest.artifacts:
        (out_dir / name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfleet export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
