"""How far a long ``nixfs fsck`` got, shown while it runs.

A progress bar (rich) shows on stderr when it is a terminal and the run takes
more than a moment; elsewhere a line every ten seconds says how far it got.
"""

import sys
import time


class Progress:
    """Counts per phase, shown as a rich progress line on a terminal after *delay* s."""

    def __init__(self, *, tty: bool | None = None, delay: float = 0.5, every: float = 10.0):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.delay, self.every = delay, every
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, count: int) -> None:
        if count % 256:
            return
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        if self.tty:
            if now - self.last_line >= 0.1:
                self.last_line = now
                self._show(phase, count)
        elif now - self.last_line >= self.every:
            self.last_line = now
            print(f"nixfs fsck: {count} {phase} checked...", file=sys.stderr, flush=True)

    def _show(self, phase: str, count: int) -> None:
        if self.bar is None:
            from rich.progress import Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.bar = Bar(SpinnerColumn(), TextColumn("{task.description}"),
                           TextColumn("{task.completed}"), TimeElapsedColumn(), transient=True)
            self.bar.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(f"checking {phase}", total=None)
        self.bar.update(self.tasks[phase], completed=count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
