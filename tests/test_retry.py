"""Retries: every update is sent 2-4 times (also after a lost response, and once more after its
round merged, while the next round runs); half the phones sign every attempt. Each update is
merged exactly once: the server's counts and the model (= a one-copy numpy FedAvg) say so.
The 100-phone version is ``python -m bench.bench_faults retry``."""

from __future__ import annotations

from bench.bench_faults import TOLERANCE, retry_plan, retry_settings, run_retry, running_app


async def test_duplicates_and_lost_responses_merge_exactly_once() -> None:
    plan = retry_plan(12, seed=3)
    assert sum(plan.signed) and sum(bool(x) for row in plan.lost for x in row) and sum(map(sum, plan.late))
    async with running_app(**retry_settings(plan)) as url:
        r = await run_retry(url, plan)
    assert r["client"] == {"2xx": r["sends"] - r["lost_responses"], "4xx": 0, "5xx": 0}, r
    assert r["server_5xx"] == 0
    assert r["lost_processed"] > 0  # some first copies were merged although the phone never saw the answer
    assert r["fresh_acks_max"] == 1 and r["fresh_acks"] + r["lost_processed"] == r["updates"]
    assert r["merged_per_round"] == [12, 12] and r["updates_merged_metric"] == 24 and r["version"] == 2
    assert r["merged_into_wrong"] == 0
    # The model is the one-copy recomputation; a single double merge would move it far more.
    assert r["max_abs_diff"] <= TOLERANCE < r["double_merge_effect"], r
