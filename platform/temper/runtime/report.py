"""Reporter: how a worker hands progress to whoever shows it.

The loop calls `progress(event)` at logging and eval steps (events carry `step`,
`max_steps` and the logged metrics). The base class shows them in this process's console
(rank 0 only); the Ray entry subclasses it to forward rank 0's events to the driver.
"""

from __future__ import annotations

from typing import Any

from temper.console import ProgressDisplay


class Reporter:
    def __init__(self, display: ProgressDisplay | None = None) -> None:
        self.display = display

    def progress(self, event: dict[str, Any]) -> None:
        if self.display is not None:
            self.display.update(event)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
