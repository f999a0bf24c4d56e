"""Progress that shows in a terminal *and* in a pipe or a CI log.

Rich's live displays (bars, spinners) print nothing when the output is not a terminal, so a long step
piped to a file looks hung. :func:`progress` returns a rich bar on a terminal and otherwise a
:class:`LineProgress` that prints a plain line every ``every_seconds`` (and at the end); :func:`step`
does the same for a spinner around one long step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import Progress


class LineProgress:
    """The part of rich's ``Progress`` API the project uses, as plain lines: ``add_task``, ``advance``."""

    def __init__(self, console: Console, every_seconds: float = 15.0) -> None:
        self.console = console
        self.every_seconds = every_seconds
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self._tasks.items():
            if task["done"] < task["total"] and exc[0] is None:
                self._line(task_id)

    def add_task(self, description: str, total: float) -> int:
        task_id = len(self._tasks)
        now = time.monotonic()
        self._tasks[task_id] = {"description": description, "total": total, "done": 0, "start": now,
                                "printed": now}
        return task_id

    def advance(self, task_id: int, amount: float = 1) -> None:
        task = self._tasks[task_id]
        task["done"] += amount
        now = time.monotonic()
        if task["done"] >= task["total"] or now - task["printed"] >= self.every_seconds:
            self._line(task_id)
            task["printed"] = now

    def _line(self, task_id: int) -> None:
        t = self._tasks[task_id]
        share = t["done"] / t["total"] if t["total"] else 1.0
        self.console.print(f"{t['description']}: {t['done']:,.0f}/{t['total']:,.0f} ({share:.0%}), "
                           f"{time.monotonic() - t['start']:.0f} s", markup=False, highlight=False)


def progress(console: Console | None = None, *, enabled: bool = True) -> Progress | LineProgress:
    """A progress display for ``console`` (stderr by default): a bar on a terminal, lines elsewhere."""
    console = console or Console(stderr=True)
    if console.is_terminal or not enabled:
        return Progress(console=console, disable=not enabled, transient=True)
    return LineProgress(console)


@contextmanager
def step(console: Console, message: str) -> Iterator[None]:
    """A spinner with ``message`` on a terminal; elsewhere the message, then the time it took."""
    if console.is_terminal:
        with console.status(message):
            yield
        return
    console.print(f"{message} ...", markup=False, highlight=False)
    start = time.monotonic()
    yield
    console.print(f"{message}: done in {time.monotonic() - start:.0f} s", markup=False, highlight=False)
