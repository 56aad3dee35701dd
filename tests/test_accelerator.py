"""Where training arithmetic runs: torch's intra-op threads and the ``--device`` of batched training and
of the server's evaluation. More threads or another device change how sums are split, never what is
computed: the results equal the one-thread CPU results within float rounding."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from fedfleet.cli import main
from fedfleet.device_runtime.batched import Job, Params, train_many
from fedfleet.device_runtime.runtimes.base import TrainConfig, TrainResult
from fedfleet.export.accelerator import fit_rows, resolve_device
from fedfleet.export.models import ModelSpec, build_model
from fedfleet.server.evaluation import Evaluation, Evaluator
from fedfleet.simulate_config import SimulateConfig
from fedfleet.tuning import parse_threads

SPEC = ModelSpec("cnn", (1, 28, 28), 10)  # the built-in CNN on mnist-shaped inputs
CFG = TrainConfig(local_epochs=1, batch_size=16, lr=0.05, prox_mu=0.1)
SIZES = (40, 17, 33, 16, 5, 28)  # partial last batches, phones of different step counts
NO_CUDA = "no CUDA device on this machine (torch.cuda.is_available() is False): the device path runs on GPUs only"
T = TypeVar("T")


def _jobs(seed: int = 3) -> list[Job]:
    data = np.random.default_rng(seed)
    return [(data.random((n, 1, 28, 28), dtype=np.float32), data.integers(0, 10, n), np.random.default_rng([seed, i]))
            for i, n in enumerate(SIZES)]


def _params(dtype: type[np.floating[Any]]) -> tuple[torch.nn.Module, Params]:
    model = build_model(SPEC, seed=0)
    return model, {n: p.detach().numpy().astype(dtype) for n, p in model.named_parameters()}


def _on_thread(threads: int, fn: Callable[[], T]) -> T:
    """``fn`` on a new thread whose torch intra-op team has ``threads`` threads (a thread keeps the team
    size it first ran with, so each setting gets a thread of its own, as BatchedTrainer's worker does)."""
    before = torch.get_num_threads()

    def run() -> T:
        torch.set_num_threads(threads)
        return fn()

    try:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()
    finally:
        torch.set_num_threads(before)


def _train(dtype: torch.dtype, threads: int, device: str = "cpu") -> list[tuple[Params, TrainResult]]:
    model, params = _params(np.float64 if dtype == torch.float64 else np.float32)
    return _on_thread(threads, lambda: train_many(model, params, _jobs(), CFG, chunk=4, dtype=dtype, device=device))


def _assert_close(a: list[tuple[Params, TrainResult]], b: list[tuple[Params, TrainResult]], rtol: float) -> None:
    for (da, ra), (db, rb) in zip(a, b, strict=True):
        assert (ra.steps, ra.num_examples) == (rb.steps, rb.num_examples)
        assert ra.loss == pytest.approx(rb.loss, rel=rtol)
        for name in da:
            scale = float(np.abs(da[name]).max()) or 1.0
            np.testing.assert_allclose(da[name], db[name], rtol=0, atol=rtol * scale, err_msg=name)


def test_two_intra_op_threads_train_as_one_within_float32_rounding() -> None:
    one, two = _train(torch.float32, 1), _train(torch.float32, 2)
    _assert_close(one, two, rtol=1e-5)


def test_two_intra_op_threads_train_as_one_exactly_in_float64() -> None:
    one, two = _train(torch.float64, 1), _train(torch.float64, 2)
    for (da, ra), (db, rb) in zip(one, two, strict=True):
        assert ra == rb
        assert all(np.array_equal(da[n], db[n]) for n in da)


def test_an_explicit_cpu_device_is_the_default_path_bit_for_bit() -> None:
    """device="cpu" given explicitly runs the device plumbing (batches and parameters moved to the device,
    results fetched in one transfer per dtype) and changes no float."""
    default = _on_thread(1, lambda: train_many(*_params(np.float32), _jobs(), CFG, chunk=4))
    explicit = _train(torch.float32, 1, device="cpu")
    for (da, ra), (db, rb) in zip(default, explicit, strict=True):
        assert ra == rb
        assert da.keys() == db.keys() and all(np.array_equal(da[n], db[n]) for n in da)


def _evaluator(device: str) -> tuple[Evaluator, Params]:
    data = np.random.default_rng(5)
    x, y = data.random((300, 1, 28, 28), dtype=np.float32), data.integers(0, 10, 300)
    _, params = _params(np.float32)
    return Evaluator((SPEC.name, SPEC.input_shape, SPEC.num_classes), x, y, seed=0, device=device), params


def test_evaluation_on_an_explicit_cpu_device_scores_as_an_eager_model() -> None:
    evaluator, params = _evaluator("cpu")
    got = evaluator.evaluate(params, batch_size=128)
    model = build_model(SPEC, seed=0).eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(evaluator.x[i:i + 128])) for i in range(0, 300, 128)])
    y = torch.from_numpy(evaluator.y)
    assert got.accuracy == float((logits.argmax(1) == y).double().mean())
    assert got.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert evaluator.evaluate(params, batch_size=128) == got  # the split stays on the device: same floats again


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_trains_and_evaluates_as_the_cpu_in_float64() -> None:
    _assert_close(_train(torch.float64, 1), _train(torch.float64, 1, device="cuda"), rtol=1e-10)
    cpu, params = _evaluator("cpu")
    cuda, _ = _evaluator("cuda")
    a, b = cpu.evaluate(params), cuda.evaluate(params)
    assert isinstance(b, Evaluation) and b.accuracy == pytest.approx(a.accuracy, abs=1 / 300)
    assert b.loss == pytest.approx(a.loss, rel=1e-4)


def test_cuda_chunks_are_what_fits_in_half_the_free_memory() -> None:
    assert fit_rows(free_bytes=1000, bytes_per_row=100, cap=128) == 5
    assert fit_rows(free_bytes=10**12, bytes_per_row=100, cap=128) == 128
    assert fit_rows(free_bytes=10, bytes_per_row=100, cap=128) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["simulate", "--device", "cuda", "--phones", "4", "--rounds", "1", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip() == ("fedfleet simulate: error: --device cuda: no CUDA device "
                           "(torch.cuda.is_available() is False)")
    assert not (tmp_path / "run").exists()


def test_device_auto_resolves_to_what_torch_sees() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == want
    assert SimulateConfig(device="auto").fleet_config().device == want
    assert SimulateConfig(device="cpu").fleet_config().device == "cpu"


def test_train_threads_take_a_count_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    assert parse_threads("3") == 3
    assert parse_threads("auto") == len(os.sched_getaffinity(0))
    rc = main(["simulate", "--train-threads", "0"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("fedfleet simulate: error: --train-threads 0: give a number of "
                                               "threads (at least 1) or auto")


@pytest.mark.parametrize("flags", [["--trainer", "pool"], ["--mode", "gossip"], ["--runtime", "onnx"]])
def test_device_cuda_is_refused_where_phones_would_train_on_the_cpu(capsys: pytest.CaptureFixture[str],
                                                                    flags: list[str]) -> None:
    rc = main(["simulate", "--device", "cuda", *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith("fedfleet simulate: error: --device cuda trains with --trainer batched"), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: device cuda is valid here")
def test_a_server_configured_for_cuda_without_a_gpu_is_refused_when_configured() -> None:
    from fedfleet.server.config import ServerConfig

    with pytest.raises(ValueError, match=r"no CUDA device \(torch.cuda.is_available\(\) is False\)"):
        ServerConfig(device="cuda")
    assert ServerConfig(device="auto").device == "auto"  # resolved where the evaluator is built
