"""An image-folder task end to end: sklearn's digits written as PNG files, one folder per class, then
trained with ``--dataset imagefolder:DIR`` from Python (the command line takes the same spec):

    python examples/imagefolder_digits.py /tmp/digits-png runs/imagefolder
    fedfleet simulate --dataset imagefolder:/tmp/digits-png --image-size 16 --model cnn --phones 10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_digit_pngs(root: str | Path, per_class: int = 60) -> Path:
    """``per_class`` digits of each class as 8x8 grey PNGs in ROOT/<class>/<i>.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    d = load_digits()
    for label in range(10):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(d.images[d.target == label][:per_class]):
            Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root


def main(argv: list[str]) -> int:
    import fedfleet

    folder = write_digit_pngs(argv[0] if argv else "runs/digits-png")
    summary = fedfleet.run_simulation(model="cnn", dataset=f"imagefolder:{folder}", image_size=16, phones=10,
                                      rounds=5, local_epochs=2, out=argv[1] if len(argv) > 1 else "runs/imagefolder",
                                      progress=True)
    print(f"final accuracy {summary['final_accuracy']:.3f}; weights in {summary['final_weights']['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
