"""A gossip round's record beyond training: how good the phones' models are, and what went through
the relay (fedfleet/gossip_run.py; docs/gossip.md, "Round records")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedfleet.device_runtime.gossip_math import average, consensus_distance

if TYPE_CHECKING:
    import aiohttp

    from fedfleet.protocol.topology import Topology
    from fedfleet.server.evaluation import Evaluator


def scores(models: list[dict[str, np.ndarray]], evaluator: Evaluator, draws: np.random.Generator,
           sample_size: int) -> dict[str, Any]:
    """Accuracy and loss of the average model; accuracy of ``sample_size`` phones' own models drawn
    from ``draws`` (all of them in smaller fleets): mean, 10th and 90th percentile; the consensus distance."""
    mean = evaluator.evaluate(average(models))
    n = len(models)
    sample = range(n) if n <= sample_size else sorted(draws.choice(n, sample_size, replace=False).tolist())
    task = {"metrics": mean.metrics} if mean.metrics else {}  # the task's own (--metrics)
    if mean.accuracy is None:  # a regression: no accuracy to spread
        return {"accuracy": None, "loss": mean.loss, "consensus_distance": consensus_distance(models), **task}
    own = np.array([evaluator.evaluate(models[i]).accuracy for i in sample])
    return {"accuracy": mean.accuracy, "loss": mean.loss, "accuracy_mean": float(own.mean()),
            "accuracy_p10": float(np.percentile(own, 10)), "accuracy_p90": float(np.percentile(own, 90)),
            "consensus_distance": consensus_distance(models), **task}


async def traffic(session: aiohttp.ClientSession, url: str, r: int, topology: Topology,
                  expected: int) -> dict[str, Any]:
    """Round ``r``'s bytes as the relay counted them, and its dropped messages: of the two
    messages each edge carries, those that did not arrive (a phone away sent or fetched nothing)."""
    async with session.get(f"{url}/v1/gossip/status?round={r}") as resp:
        resp.raise_for_status()
        counts = (await resp.json())["rounds"].get(str(r), {})
    delivered = int(counts.get("delivered", 0))
    if delivered != expected:
        raise RuntimeError(f"round {r}: the relay delivered {delivered} messages, the phones fetched {expected}")
    return {"bytes_up": int(counts.get("bytes_up", 0)), "bytes_down": int(counts.get("bytes_down", 0)),
            "messages": int(counts.get("messages", 0)),
            "messages_dropped": 2 * len(topology.edges(r)) - delivered}
