"""Progress of a run on a terminal (``rich``): one bar per phase that advances by the work done in it
(accesses, or memslot-test loops), silent with ``--quiet`` or when stderr is not a terminal."""

import sys


class PhaseProgress:
    """``start(name, total, unit)`` a phase, call with the work done since, ``close()`` at its end.
    ``total`` 0 means unknown (the bar only counts)."""

    def __init__(self, enabled=True):
        self.enabled = bool(enabled) and sys.stderr.isatty()
        self.done = 0
        self._bar = self._task = None

    def start(self, name, total, unit="accesses"):
        self.done = 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self._bar = Progress(TextColumn("  {task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                             console=Console(file=sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(name, total=total or None, unit=unit)

    def __call__(self, n):
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None
