"""Progress for long work: a live line on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType

from rich import progress as rich_progress
from rich.console import Console
from rich.markup import escape
from rich.progress import SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

# What long work reports to: progress(phase, detail).
Progress = Callable[[str, str], None]
WARNING = "warning"  # not a phase: a line the user should read, shown as it is


def quiet(phase: str, detail: str) -> None:
    """The progress callback that shows nothing (the Python API's default)."""


class PhaseDisplay:
    """Shows `what · phase · elapsed · detail` while a long job runs.

    Used as the `progress` callback of build and boot: call it with a phase
    name and a detail line.
    """

    def __init__(self, what: str, console: Console) -> None:
        self.what = what
        self.console = console
        self.live = console.is_terminal
        self.started = time.monotonic()
        self.phase = ""
        self._progress: rich_progress.Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> PhaseDisplay:
        if self.live:
            self._progress = rich_progress.Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.what)
        return self

    def __call__(self, phase: str, detail: str) -> None:
        if phase == WARNING:  # a line of its own, kept above the live one
            self.console.print(f"[yellow]warning:[/] {escape(detail)}")
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.what} · [bold]{phase}[/] · {detail[:70]}")
        elif phase != self.phase:
            elapsed = time.monotonic() - self.started
            print(f"{self.what}: {phase} ({elapsed:.0f}s) {detail}", file=sys.stderr, flush=True)
        self.phase = phase

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
