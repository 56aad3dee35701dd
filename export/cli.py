"""``fedfleet export``: model + dataset shapes (+ weights) -> bundle directory.

``register`` adds the subcommand to the top-level parser in ``fedfleet/cli.py``;
``python -m fedfleet.export.cli ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfleet.export.manifest import MANIFEST

if TYPE_CHECKING:
    from fedfleet.export.manifest import Manifest

FINAL_WEIGHTS = "final_weights.safetensors"  # what every run writes (fedfleet.task.FINAL_WEIGHTS)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("export", help="export a model to an on-device bundle (ExecuTorch + ONNX)")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="mlp | cnn | mobilenet | MODULE:ATTR, a callable returning a "
                                        "torch.nn.Module (default with --from-run: the run's)")
    parser.add_argument("--dataset", help="dataset whose input shape and classes the model takes (default with "
                                          "--from-run: the run's)")
    parser.add_argument("--image-size", type=int, default=None, help="imagefolder:PATH: the side images are "
                                                                     "resized to (default 32, or the run's)")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    parser.add_argument("--seed", type=int, default=None, help="seed of the initial weights (default 0, or the run's)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="the weights to ship: a safetensors state_dict (e.g. a run's final_weights.safetensors) "
                             "or a torch one (weights_only=True); phones get them as weights.safetensors "
                             "(default: drawn from --seed)")
    parser.add_argument("--from-run", type=Path, default=None,
                        help="a `fedfleet simulate --out` folder (or a `serve --data-dir`): ship its "
                             f"{FINAL_WEIGHTS}, for its model and dataset unless given")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="default task batch size, recorded in the manifest (default %(default)s, as the server's plan)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch model.pte accepts")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="default task learning rate, recorded in the manifest (default %(default)s, as the server's plan)")
    parser.add_argument("--backbone-weights", type=Path, default=None, help="MobileNetV3-small state dict")
    parser.add_argument("--loss", default=None, help="the task's loss, traced into model.pte and train_step.onnx: "
                                                     "MODULE:ATTR, (outputs, targets) -> mean over the batch "
                                                     "(default: cross-entropy, or the run's)")


def _task_of(args: argparse.Namespace) -> dict[str, Any]:
    """model, dataset, seed, image_size and weights: the flags, else the run's (--from-run)."""
    task: dict[str, Any] = {"model": None, "dataset": None, "seed": 0, "image_size": 32, "weights": args.weights,
                            "loss": None}
    if args.from_run is not None:
        if args.weights is not None:
            raise ValueError("--weights and --from-run: give one")
        weights = args.from_run / FINAL_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"--from-run {args.from_run}: no {FINAL_WEIGHTS} there (written by `fedfleet "
                             "simulate --out DIR` after its run, and by `fedfleet serve --data-dir DIR` at shutdown)")
        task["weights"] = weights
        summary = args.from_run / "summary.json"
        if summary.is_file():
            config = json.loads(summary.read_text()).get("config", {})
            task.update({k: config[k] for k in ("model", "dataset", "seed", "image_size", "loss") if k in config})
    for key in ("model", "dataset", "seed", "image_size", "loss"):
        if getattr(args, key) is not None:
            task[key] = getattr(args, key)
    missing = [f"--{k}" for k in ("model", "dataset") if task[k] is None]
    if missing:
        raise ValueError(f"give {' and '.join(missing)} (or --from-run with a simulate run's folder)")
    return task


def run(args: argparse.Namespace) -> int:
    from fedfleet.cli_errors import checking_input
    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.export.build import ExportConfig, export_bundle, export_model
    from fedfleet.export.quiet import held_back
    from fedfleet.export.refs import check_model_name
    from fedfleet.export.task_loss import check_task

    with checking_input():  # the model, dataset, weights and settings the user named
        task = _task_of(args)
        check_model_name(task["model"])
        data = load_dataset(task["dataset"], seed=task["seed"], image_size=task["image_size"])
        if data.regression:
            raise ValueError(f"--dataset {task['dataset']}: float targets (a regression task): model.pte and "
                             "train_step.onnx take class labels; train it with --runtime torch")
        cfg = ExportConfig(
            model=task["model"],
            dataset=task["dataset"],
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            seed=task["seed"],
            batch_size=args.batch_size,
            lr=args.lr,
            max_batch=args.max_batch,
            backbone_weights=args.backbone_weights,
            weights=task["weights"],
            loss=task["loss"],
        )
        model = export_model(cfg)
        check_task(model, data.x_train, data.y_train, cfg.loss, None)
    start = time.perf_counter()
    with held_back():  # torch's own messages about a failed trace would bury the one line below
        manifest = export_bundle(cfg, args.out, model)
    failed = failures(manifest)
    if failed:  # one line, nothing claimed: the directory is left without a manifest or artifacts
        withdraw(args.out, manifest)
        print(f"fedfleet export: error: {'; '.join(failed)}" + (f" (training with --loss {cfg.loss})" if cfg.loss else ""),
              file=sys.stderr)
        return 2
    print(
        f"exported {cfg.model} for {cfg.dataset} {cfg.input_shape} -> {args.out} in {time.perf_counter() - start:.1f}s"
        + (f", weights from {cfg.weights}" if cfg.weights else "")
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
