"""User-facing console output: a progress bar in a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)


def _fmt(event: dict[str, Any]) -> str:
    parts = [f"step {event['step']}/{event['max_steps']}"]
    for key, label, spec in (
        ("train/loss", "loss", ".4f"),
        ("val/loss", "val_loss", ".4f"),
        ("val/acc", "val_acc", ".3f"),
        ("train/lr", "lr", ".2e"),
        ("perf/samples_per_s", "samples/s", ".1f"),
        ("perf/tokens_per_s", "tokens/s", ".0f"),
        ("perf/mfu", "mfu", ".1%"),
    ):
        if key in event:
            parts.append(f"{label} {event[key]:{spec}}")
    return "  ".join(parts)


class ProgressDisplay:
    """Shows training progress: a rich bar with ETA on a TTY, one line per update elsewhere."""

    def __init__(self, *, title: str, interactive: bool | None = None) -> None:
        self.title = title
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._progress: Progress | None = None
        self._task = None

    def _start(self, total: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.title, total=total, info="")

    def update(self, event: dict[str, Any]) -> None:
        if not self.interactive:
            console.print(f"[{self.title}] {_fmt(event)}", markup=False)
            return
        if self._progress is None:
            self._start(event["max_steps"])
        info = _fmt(event).split("  ", 1)[-1]
        self._progress.update(self._task, completed=event["step"], info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
