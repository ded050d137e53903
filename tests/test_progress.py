"""Progress output in a log (stderr not a terminal): whole lines, at most one per bar every 30 s, no carriage return."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import tqdm.std
from click.testing import CliRunner

from medtta import progress
from medtta.cli.main import main
from medtta.progress import LogLines, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # the clock of every bar created from now
    return fake


@pytest.mark.parametrize("leave", [True, False])
def test_a_bar_in_a_log_writes_a_line_every_30_s_and_its_end(clock: Clock, leave: bool) -> None:
    log = io.StringIO()
    for _ in LogLines(range(100), desc="cases", unit="case", file=log, leave=leave):
        clock.now += 1.0  # one item a second: lines after 30, 60 and 90 s, and the end
        LogLines.write("a message between the lines", file=log)
    lines = [line for line in log.getvalue().splitlines() if not line.startswith("a message")]
    assert "\r" not in log.getvalue()
    assert [line.split(" [")[0] for line in lines] == [f"cases: {n}/100 case" for n in (30, 60, 90, 100)]


def test_a_short_bar_writes_one_line_and_an_idle_one_none(clock: Clock) -> None:
    log = io.StringIO()
    with LogLines(total=3, desc="models", file=log) as bar:
        bar.set_postfix(best=0.5)  # refreshes: no line before 30 s
        bar.update(3)
    LogLines(total=3, desc="nothing", file=log).close()
    assert log.getvalue().splitlines() == ["models: 3/3 it [00:00<?, best=0.5]"]  # the clock stood still


def test_progress_bar_draws_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(progress_bar(range(2), disable=True), LogLines)  # pytest's stderr is no terminal
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True)
    assert not isinstance(progress_bar(range(2), disable=True), LogLines)


def test_a_bench_log_has_no_carriage_return(dataset: Path, results: Path, tmp_path: Path) -> None:
    args = ["bench", "--datasets", str(dataset), "--source-site", "A", "--epochs", "2", "--results", str(results),
            "--methods", "source,bn-stats", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    assert "cells: 2/2 cell" in result.stderr and len(result.stderr.splitlines()) <= 10, result.stderr
