"""Write ``data/samples.json``: sample digits bundled with the web phone so it can train at once.

They are scikit-learn's 8x8 digits (values 0..16, as the phone's canvas produces them),
taken from fedfleet's *training* split of ``digits`` (``device_runtime.data.load_dataset``,
seed 0) so that the server's held-out evaluation set never reaches a phone: ``PER_CLASS`` of
each class, in the split's order. Each image is a string of 64 base-17 digits ("0"-"9",
"a"-"g"), row-major; the page divides by 16 as ``load_dataset`` does.

    .venv/bin/python android_demo/web/tools/make_samples.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parents[1] / "data" / "samples.json"
PER_CLASS = 50
DIGITS = "0123456789abcdefg"


def main() -> None:
    sys.path.insert(0, str(REPO))
    from fedfleet.device_runtime.data import load_dataset

    data = load_dataset("digits", seed=0)
    levels = np.rint(data.x_train[:, 0] * 16).astype(int)  # exact: load_dataset divided by 16.0
    assert np.array_equal(levels / 16.0, data.x_train[:, 0]) and levels.min() >= 0 and levels.max() <= 16
    picked = sorted(i for c in range(10) for i in np.flatnonzero(data.y_train == c)[:PER_CLASS])
    doc = {
        "description": "sklearn digits from fedfleet's training split (load_dataset('digits', seed=0)); "
        "64 base-17 digits per image, row-major, value / 16 = pixel",
        "shape": [1, 8, 8],
        "count": len(picked),
        "labels": [int(data.y_train[i]) for i in picked],
        "pixels": ["".join(DIGITS[v] for v in levels[i].ravel()) for i in picked],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {len(picked)} digits to {OUT}")


if __name__ == "__main__":
    main()
