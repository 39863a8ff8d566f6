"""Live job progress in the terminal: done / running / failed / queued, retries and an ETA.

On a terminal it is a rich progress bar with events printed above it; in a log file or CI (not a TTY) it is one
plain line per event plus a status line at most every `every_s` seconds, so logs stay readable.
"""
from __future__ import annotations

import sys
import time

from jobs.plan import format_duration


class JobProgress:
    def __init__(self, total: int, already_done: int, *, live: bool | None = None, every_s: float = 15.0):
        self.total = total
        self.already_done = already_done
        self.live = sys.stdout.isatty() if live is None else live
        self.every_s = every_s
        self._last_plain = 0.0
        self._bar = None
        self._task = None
        self.counts = {"done": 0, "running": 0, "failed": 0, "queued": total, "retries": 0}
        self.eta_s: float | None = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]render"), BarColumn(bar_width=16), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)
            self._task = self._bar.add_task(self._short(), total=max(1, total))
            self._bar.start()

    def _status(self) -> str:
        c = self.counts
        eta = "--" if self.eta_s is None else format_duration(self.eta_s)
        return (f"done {c['done']}/{self.total} · running {c['running']} · failed {c['failed']} · "
                f"queued {c['queued']} · retries {c['retries']} · ETA {eta}")

    def _short(self) -> str:  # for the live bar, which shares one terminal line with the bar itself
        c = self.counts
        eta = "--" if self.eta_s is None else format_duration(self.eta_s)
        return (f"run {c['running']} · fail {c['failed']} · queue {c['queued']} · retry {c['retries']} · "
                f"ETA {eta}")

    def event(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, flush=True)

    def update(self, *, done: int, running: int, failed: int, queued: int, retries: int,
               eta_s: float | None) -> None:
        self.counts = {"done": done, "running": running, "failed": failed, "queued": queued, "retries": retries}
        self.eta_s = eta_s
        if self._bar is not None:
            self._bar.update(self._task, completed=done + failed, description=self._short())
        elif time.monotonic() - self._last_plain >= self.every_s:
            self._last_plain = time.monotonic()
            print(f"[progress] {self._status()}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=self._short())
            self._bar.stop()
            self._bar = None
        else:
            print(f"[progress] {self._status()}", flush=True)
