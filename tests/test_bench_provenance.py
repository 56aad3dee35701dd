"""Every benchmark result written through bench.common.write carries the command that produced it, its
UTC date and the machine, so a figure can be read, and reproduced, without a story around it."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import pytest

from bench.common import write


def test_a_result_carries_its_command_date_and_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["bench/bench_load.py", "--conns", "100,1000", "--out", "my load"])
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    path = write("load", {"levels": [1, 2]}, directory=tmp_path)
    after = datetime.datetime.now(datetime.UTC)
    assert path == tmp_path / "load.json"
    result = json.loads(path.read_text())
    assert list(result) == ["command", "date", "machine", "levels"]
    assert result["command"].endswith(" --conns 100,1000 --out 'my load'")
    assert before <= datetime.datetime.fromisoformat(result["date"]) <= after
    assert result["machine"]["cores"] == os.cpu_count()
    assert result["machine"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert result["levels"] == [1, 2]
