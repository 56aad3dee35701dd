"""Local training off the event loop, on a small pool of shared runtimes.

An idle phone holds no model: a task borrows a runtime from the pool, loads the
downloaded parameters, trains, and returns the delta. Pool size = parallel trainings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from device_runtime.runtimes import TrainConfig, TrainingRuntime, TrainResult

Params = dict[str, np.ndarray]


class RuntimePool:
    def __init__(self, factory: Callable[[], TrainingRuntime], size: int = 1) -> None:
        if size < 1:
            raise ValueError("a runtime pool needs at least one runtime")
        # Phone-sized models gain nothing from intra-op threads, and OpenMP's spin-waiting makes
        # them several times slower when the cores are shared: parallelism comes from the pool.
        torch.set_num_threads(1)
        self._free: asyncio.Queue[TrainingRuntime] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(factory())
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="fedfleet-train")
        self.size = size

    async def train(
        self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
    ) -> tuple[Params, TrainResult]:
        """Train from ``params`` on (x, y); return (new params - params, result)."""
        runtime = await self._free.get()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, _train_delta, runtime, params, x, y, cfg, rng)
        finally:
            self._free.put_nowait(runtime)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _train_delta(
    runtime: TrainingRuntime,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> tuple[Params, TrainResult]:
    runtime.set_params(params)
    result = runtime.train(x, y, cfg, rng)
    new = runtime.get_params()
    return {n: (new[n] - params[n]).astype(np.float32) for n in params}, result
