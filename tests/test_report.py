"""``fedfleet report``: plots and report.html from recorded runs; numbers must match metrics.jsonl."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedfleet.report import cmd_report, load_runs, register, render
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig

ALWAYS = ["accuracy_loss", "bytes", "latency"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sim"
    asyncio.run(simulate(SimulateConfig(phones=6, rounds=3, model="mlp", local_epochs=1, out=str(out), workers=1)))
    return out


def write_run(path: Path, rounds: list[dict[str, Any]], devices: list[dict[str, Any]] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if devices:
        with (path / "devices.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(devices[0]))
            writer.writeheader()
            writer.writerows(devices)
    return path


def base_round(n: int, **extra: Any) -> dict[str, Any]:
    return {"round": n, "version": n, "accuracy": 0.5 + 0.1 * n, "loss": 2.0 / n, "updates": 4, "bytes_up": 1000 * n,
            "bytes_down": 2000, "latency_p50_s": 0.5 * n, "latency_p95_s": n, "time_s": 3.0 * n, **extra}


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None


def as_dicts(table: list[list[str]]) -> list[dict[str, str]]:
    return [dict(zip(table[0], row, strict=True)) for row in table[1:]]


def test_report_of_a_simulated_run_matches_its_metrics(recorded_run: Path, tmp_path: Path) -> None:
    page_path = render(load_runs([recorded_run]), tmp_path / "report")
    page = page_path.read_text()
    rows = [json.loads(line) for line in (recorded_run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((recorded_run / "summary.json").read_text())
    tables = Tables(page).tables
    (head,) = as_dicts(tables[0])
    assert head["run"] == "sim" and head["rounds"] == str(len(rows)) == "3"
    assert head["final accuracy"] == f"{rows[-1]['accuracy']:.4f}"
    assert head["best accuracy"] == f"{max(r['accuracy'] for r in rows):.4f}"
    assert head["bytes up"] == str(sum(r["bytes_up"] for r in rows)) == str(summary["bytes_up"])
    assert head["bytes down"] == str(sum(r["bytes_down"] for r in rows))
    assert head["max p95 latency s"] == f"{max(r['latency_p95_s'] for r in rows):.4f}"
    assert head["phones"] == "6"
    per_round = as_dicts(tables[1])
    assert [r["round"] for r in per_round] == ["1", "2", "3"]
    assert [r["accuracy"] for r in per_round] == [f"{r['accuracy']:.4f}" for r in rows]
    assert [r["bytes_up"] for r in per_round] == [str(r["bytes_up"]) for r in rows]
    # Every PNG is on disk and embedded byte for byte; devices.csv gives the per-phone plots.
    pngs = sorted(p.stem for p in (tmp_path / "report").glob("*.png"))
    assert set(ALWAYS + ["participation", "device_latency"]) <= set(pngs)
    assert page.count("data:image/png;base64,") == len(pngs)
    embedded = page.split('alt="bytes" src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(embedded) == (tmp_path / "report" / "bytes.png").read_bytes()
    assert "http://" not in page and "https://" not in page  # self-contained


def test_optional_fields_are_plotted_when_present(tmp_path: Path) -> None:
    rounds = [base_round(n, dense_bytes=8000 * n, staleness_mean=1.5, staleness_max=n, epsilon_max=0.4 * n,
                         epsilon_median=0.3 * n, virtual_time_s=100.0 * n, latency_max_s=2.0 * n,
                         accuracy_p10=0.1 * n, accuracy_p90=0.2 * n, consensus_distance=1.0 / n) for n in (1, 2, 3)]
    devices = [{"phone": f"p{i}", "participations": i, "epsilon": 0.1 * i, "download_mean_s": 0.2,
                "train_mean_s": 1.0 + i, "upload_mean_s": 0.3, "latency_mean_s": 1.6 + i} for i in range(4)]
    run = write_run(tmp_path / "full", rounds, devices)
    page = render(load_runs([run]), tmp_path / "out").read_text()
    pngs = {p.stem for p in (tmp_path / "out").glob("*.png")}
    assert pngs == {*ALWAYS, "staleness", "privacy", "participation", "device_latency", "gossip"}
    (head,) = as_dicts(Tables(page).tables[0])
    assert head["final epsilon_max"] == "1.2000" and head["time s"] == "300.0000"  # virtual time wins
    assert "Not recorded" not in page


def test_missing_optional_fields_are_skipped_with_a_note(tmp_path: Path) -> None:
    run = write_run(tmp_path / "bare", [base_round(1), base_round(2)])
    page = render(load_runs([run]), tmp_path / "out").read_text()
    assert {p.stem for p in (tmp_path / "out").glob("*.png")} == set(ALWAYS)
    assert "Not recorded in these runs: Staleness" in page and "Privacy budget" in page


def test_two_runs_are_compared_in_one_report(recorded_run: Path, tmp_path: Path) -> None:
    other = write_run(tmp_path / "other", [base_round(n) for n in (1, 2, 3, 4)])
    out = tmp_path / "cmp"
    page = render(load_runs([recorded_run, other]), out).read_text()
    summary = as_dicts(Tables(page).tables[0])
    assert [r["run"] for r in summary] == ["sim", "other"] and summary[1]["rounds"] == "4"
    assert summary[1]["bytes up"] == str(1000 * (1 + 2 + 3 + 4))
    assert len(Tables(page).tables) == 3  # summary + one per-round table per run
    # Runs whose folders share a name are told apart by their paths.
    twin = tmp_path / "elsewhere" / "sim"
    shutil.copytree(recorded_run, twin)
    names = [r.name for r in load_runs([recorded_run, twin])]
    assert names == [str(recorded_run), str(twin)]


def test_cli_default_output_is_inside_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    run = write_run(tmp_path / "r", [base_round(1)])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", str(run)])
    assert cmd_report(args) == 0
    assert (run / "report" / "report.html").is_file() and "report.html" in capsys.readouterr().out


def test_bad_input_names_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run folder not found: .*missing"):
        load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/metrics\.jsonl"):
        load_runs([tmp_path / "empty"])
    bad = write_run(tmp_path / "bad", [base_round(1)])
    with (bad / "metrics.jsonl").open("a") as f:
        f.write('{"round": 2, "accuracy": 0.9\n')
    with pytest.raises(ValueError, match=r"bad/metrics\.jsonl:2: not valid JSON"):
        load_runs([bad])
    (bad / "metrics.jsonl").write_text(json.dumps(base_round(1)) + "\n\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: a round record must be an object"):
        load_runs([bad])
    devices = write_run(tmp_path / "dev", [base_round(1)], [{"phone": "a", "participations": 1},
                                                             {"phone": "b", "participations": "lots"}])
    with pytest.raises(ValueError, match=r"dev/devices\.csv:3: column 'participations' is not a number"):
        load_runs([devices])


def test_cli_exits_2_with_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedfleet import cli

    if "report" not in cli.build_parser().format_help():
        pytest.skip("`fedfleet report` is not registered in fedfleet/cli.py yet")
    bad = write_run(tmp_path / "bad", [base_round(1)])
    (bad / "metrics.jsonl").write_text("not json\n")
    assert cli.main(["report", str(bad)]) == 2
    assert "metrics.jsonl:1: not valid JSON" in capsys.readouterr().err
