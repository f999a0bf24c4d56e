"""Progress shows in a pipe, not only in a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from monitor.progress import LineProgress, progress, step


def piped() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_a_pipe_gets_plain_progress_lines_and_a_final_one():
    console, buf = piped()
    shown = progress(console)
    assert isinstance(shown, LineProgress)
    shown.every_seconds = 0  # a line per update
    with shown as bar:
        task = bar.add_task("model forward", total=40)
        for _ in range(5):
            bar.advance(task, 8)
    lines = buf.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"model forward: {n}/40" for n in (8, 16, 24, 32, 40)]
    assert lines[-1].startswith("model forward: 40/40 (100%)")


def test_a_terminal_gets_rich_bars_and_disabled_progress_prints_nothing():
    assert isinstance(progress(Console(file=io.StringIO(), force_terminal=True)), Progress)
    console, buf = piped()
    with progress(console, enabled=False) as bar:
        bar.advance(bar.add_task("quiet", total=3), 3)
    assert buf.getvalue() == ""


def test_step_prints_the_message_and_the_time_in_a_pipe():
    console, buf = piped()
    with step(console, "calibrating [detectors]"):
        pass
    assert buf.getvalue().splitlines()[0] == "calibrating [detectors] ..."
    assert buf.getvalue().splitlines()[1].startswith("calibrating [detectors]: done in ")
