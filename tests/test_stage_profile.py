"""bench/stage_profile.py gives each sampled stack a stage (imports first, then the named stages,
fedfleet's other code last) and sums py-spy's collapsed stacks per stage."""

from __future__ import annotations

from pathlib import Path

from bench.stage_profile import parse_raw, stage_of

LOOP = "run_forever (asyncio/base_events.py:608)"


def test_the_innermost_named_frame_decides() -> None:
    assert stage_of([LOOP, "handle (server/routes.py:40)", "decode (protocol/codec/decoder.py:12)"]) == "codec"
    assert stage_of([LOOP, "step (device_runtime/batched.py:200)", "conv2d (torch/nn/functional.py:1)"]) == "training"
    assert stage_of([LOOP, "publish (server/evaluation.py:70)", "linear (torch/nn/modules/linear.py:9)"]) == "evaluation"
    assert stage_of([LOOP, "verify (protocol/signing.py:30)", "verify (nacl/signing.py:120)"]) == "signatures"
    assert stage_of([LOOP, "commit (server/store.py:88)"]) == "storage"
    assert stage_of([LOOP, "_read_ready (asyncio/selector_events.py:8)"]) == "HTTP and event loop"
    assert stage_of(["<module> (fedfleet/cli.py:1)", "_find_and_load (<frozen importlib._bootstrap>:1176)",
                     "<module> (aiohttp/client.py:1)"]) == "start-up imports"
    assert stage_of(["main (something_else.py:3)"]) == "other"
    # a model's forward under the trainer is training, though its own frame names no stage
    assert stage_of([LOOP, "step (device_runtime/batched.py:200)", "CNN.forward (fedfleet/export/models.py:46)"]) \
        == "training"
    assert stage_of([LOOP, "SyncCoordinator.openings (fedfleet/server/sync_coordinator.py:146)"]) \
        == "fleet and server logic"
    assert stage_of(["_bootstrap (threading.py:1002)", "_worker (concurrent/futures/thread.py:81)"]) \
        == "thread pool waiting"


def test_collapsed_stacks_are_summed_per_stage(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(f"process 1:\"python\";{LOOP};step (device_runtime/batched.py:200) 7\n"
                   f"process 1:\"python\";{LOOP};step (device_runtime/batched.py:201) 3\n"
                   f"process 2:\"python\";{LOOP};commit (server/store.py:88) 5\n")
    assert parse_raw(raw) == {"training": 10, "storage": 5}
