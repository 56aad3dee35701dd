"""Where a whole ``fedfleet simulate`` process spends its CPU, by stage, from one sampling profile.

py-spy samples every thread of the process and of its children (a server process) at ``rate`` Hz,
idle threads left out, so a stage's samples / rate are the CPU seconds it used. Each sample is
given a stage by its frames (their files): imports first (a module executing at import time is
start-up, whatever the module is), then the work stages in STAGES' order, each matched by any
frame; the rest goes to the innermost frame of the event loop (HTTP) or of fedfleet's other code. Training arithmetic is the
batched trainer and the runtimes (the torch ops under them included); evaluation is the server's
central evaluation (torch under it too). Shares are of the process's wall time: with a server
process they can add up to more than 100% (two cores).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# (stage, substrings of a frame "function (file:line)"), tried in this order on each frame from the
# innermost outwards; the first frame that matches names the sample's stage.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("training", ("device_runtime/batched.py", "device_runtime/trainer.py", "device_runtime/runtimes/",
                  "device_runtime/task_runtime.py")),
    ("evaluation", ("server/evaluation.py",)),
    ("signatures", ("nacl/", "protocol/signing.py", "server/security.py")),
    ("codec", ("protocol/codec", "protocol/wire.py", "protocol/encodings.py", "protocol/__init__.py",
               "protocol/state.py", "safetensors")),
    ("storage", ("server/store.py", "server/store_", "sqlite3")),
    ("merge", ("server/strateg", "server/aggregation", "server/robust", "server/merge")),
    ("HTTP and event loop", ("aiohttp/", "asyncio/", "uvloop", "server/routes.py", "server/http.py",
                             "protocol_client.py", "json/", "yarl/", "multidict/")),
]
# Only when no frame of the stack names a stage above: the rest of fedfleet's own code (a model's
# forward names no stage, the trainer or the evaluation under it does).
FALLBACK = ("fleet and server logic", ("device_runtime/", "server/", "fedfleet/"))
IMPORT_MARK = "<frozen importlib._bootstrap"
# A thread pool's worker between tasks (py-spy counts some of its waits as active): not work.
POOL_WAIT = "_worker (concurrent/futures/thread.py"


def stage_of(frames: list[str]) -> str:
    """The stage of one sample's stack (outermost frame first)."""
    if any(IMPORT_MARK in f for f in frames):
        return "start-up imports"
    if frames and frames[-1].startswith(POOL_WAIT):
        return "thread pool waiting"
    for stage, marks in STAGES[:-1]:  # the work stages: any frame
        if any(m in frame for frame in frames for m in marks):
            return stage
    for frame in reversed(frames):  # else the innermost of the event loop's and fedfleet's other frames
        for stage, marks in (STAGES[-1], FALLBACK):
            if any(m in frame for m in marks):
                return stage
    return "other"


def parse_raw(path: Path) -> Counter[str]:
    """py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... COUNT``) as samples per stage."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first is the process's name
        counts[stage_of(frames)] += int(n)
    return counts


def profile_command(cmd: list[str], raw: Path, rate: int = 100, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run ``cmd`` under py-spy (children included) and return CPU seconds and shares of wall time by stage."""
    spy = Path(sys.executable).with_name("py-spy")
    t0 = time.perf_counter()
    subprocess.run([str(spy), "record", "-r", str(rate), "--format", "raw", "-o", str(raw), "--subprocesses",
                    "--", *cmd], check=True, capture_output=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    counts = parse_raw(raw)
    cpu = {stage: n / rate for stage, n in counts.most_common()}
    return {"profiler": f"py-spy record -r {rate} --subprocesses (idle threads not sampled)", "wall_s": wall,
            "cpu_s_by_stage": cpu, "cpu_s": sum(cpu.values()),
            "share_of_wall_by_stage": {stage: s / wall for stage, s in cpu.items()}}
