"""Write the Java client's data files; rerun only when the data or the float cases change.

* ``src/main/resources/org/fedfleet/client/digits.txt``: a class-balanced subset of the
  *training* split of ``device_runtime.data.load_dataset("digits", seed=0)`` (the server
  evaluates on the held-out split, so Java phones never train on it). One example a line,
  ``label:64 pixels`` with each pixel 0..16 as one character of "0123456789abcdefg";
  the phone scales by 1/16 exactly as the Python loader does.
* ``src/test/resources/org/fedfleet/wire/float_repr.txt``: doubles (hex bits) and Python's
  ``repr`` of each, the oracle for the Java shortest round-trip formatter.

Usage: ``.venv/bin/python android_demo/fedclient/tools/make_resources.py``
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from fedfleet.device_runtime.data import load_dataset  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
DIGITS = HERE / "src/main/resources/org/fedfleet/client/digits.txt"
FLOATS = HERE / "src/test/resources/org/fedfleet/wire/float_repr.txt"
PER_CLASS = 60
PIXEL_CHARS = "0123456789abcdefg"


def write_digits() -> None:
    data = load_dataset("digits", seed=0)
    pixels = np.rint(data.x_train.reshape(len(data.x_train), -1) * 16).astype(int)
    assert np.array_equal(pixels / 16.0, data.x_train.reshape(len(pixels), -1).astype(np.float64))
    lines = ["# sklearn digits, training split of load_dataset('digits', seed=0); label:64 pixels 0..g (=16)"]
    taken = dict.fromkeys(range(10), 0)
    for row, label in zip(pixels, data.y_train, strict=True):
        if taken[int(label)] < PER_CLASS:
            taken[int(label)] += 1
            lines.append(f"{int(label)}:" + "".join(PIXEL_CHARS[v] for v in row))
    DIGITS.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines) - 1} digits to {DIGITS}")


def float_cases(rng: np.random.Generator) -> list[float]:
    cases = [0.1, 1e-05, 0.0001, 1e16, 1e15, 5e-324, 1.7976931348623157e308, 123.456, 2.5e-07, 100.0,
             1e23, 9007199254740993.0, 2.2250738585072014e-308, 0.3, 2 / 3, 1e22, 1e21, 4.35, 0.6931]
    cases += [2.0**e for e in range(-1074, 1024, 7)]  # powers of two: the asymmetric gaps
    cases += [float(np.float32(v)) for v in rng.standard_normal(300)]  # float32 values as doubles
    cases += list(rng.standard_normal(300) * 10.0 ** rng.integers(-30, 30, 300))
    bits = rng.integers(0, 0x7FF0000000000000, 600, dtype=np.int64)  # finite positive doubles
    cases += [struct.unpack("<d", struct.pack("<q", int(b)))[0] for b in bits]
    cases += [float(i) for i in rng.integers(-(10**17), 10**17, 100)]
    cases += [-c for c in cases[:50]]
    return [float(c) for c in cases]  # Python floats: numpy scalars repr as np.float64(...)


def write_floats() -> None:
    cases = float_cases(np.random.default_rng(1))
    lines = ["# hex bits of a binary64, then Python's repr of it"]
    lines += [f"{struct.unpack('<Q', struct.pack('<d', v))[0]:016x} {v!r}" for v in cases]
    FLOATS.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(cases)} float cases to {FLOATS}")


if __name__ == "__main__":
    write_digits()
    write_floats()
