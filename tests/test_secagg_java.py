"""Secure rounds with Java and Python phones together: the Java client (org.fedfleet.secagg,
JDK only) and the Python fleet in the same secure groups of a real ``fedfleet serve --secure-agg``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_java_client import JAVA_PHONES, PY_PHONES, ROUNDS, classpath, run_mixed  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("javac") is None,
                                                    reason="javac not found: the Java client needs JDK 17+")]


@pytest.mark.parametrize("codec", [None, '{sparsify = "randk", density = 0.25}'], ids=["dense", "shared_randk"])
def test_java_and_python_phones_share_secure_rounds(tmp_path: Path, classpath: str,  # noqa: F811
                                                    codec: str | None) -> None:
    # every round waits for all six phones (a Python fleet can take a while to start)
    run = run_mixed(tmp_path, classpath, codec=codec, chain=False,
                    server_toml="secure_agg = true\nsecagg_step_timeout_s = 120\n")
    rounds, java = run["rounds"], run["java"]
    assert run["finished"] and [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert r["updates"] == r["secagg_survivors"] == JAVA_PHONES + PY_PHONES, r
        assert r["secagg_aborted"] == 0 and r["secagg_dropped"] == 0 and r["secagg_unmask_ms"] > 0, r
    for s in java:
        assert (s["participations"], s["rejected"], s["errors"]) == (ROUNDS, 0, 0), s
    assert run["requests"].get("POST /v1/update", 0) == 0  # no plain upload: only masked sums
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] - 0.05 and rounds[-1]["accuracy"] > 0.5, rounds


def test_java_and_python_phones_share_async_secure_groups(tmp_path: Path, classpath: str) -> None:  # noqa: F811
    """Async mode: groups of all six phones (K = 6), the Java phone taking its group's number
    from the task's round like the Python phone."""
    run = run_mixed(tmp_path, classpath, codec=None, chain=False,
                    server_toml='secure_agg = true\nsecagg_step_timeout_s = 120\nmode = "async"\n'
                                "buffer_size = 6\nconcurrency = 6\n")
    rounds, java = run["rounds"], run["java"]
    assert run["finished"] and [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert r["mode"] == "async" and r["updates"] == r["secagg_survivors"] == JAVA_PHONES + PY_PHONES, r
        assert r["secagg_group"] == r["round"] and r["staleness_max"] == 0, r
    for s in java:
        assert (s["participations"], s["rejected"], s["errors"]) == (ROUNDS, 0, 0), s
    assert run["requests"].get("POST /v1/update", 0) == 0
