"""Reporter: how a worker hands progress to whoever shows it.

The loop calls `progress(event)` at logging and eval steps (events carry `step`,
`max_steps` and the logged metrics) and `should_stop()` at logging steps. The base class
shows events in this process's console (rank 0 only) and reads a stop file; the Ray entry
subclasses it to talk to the driver's ProgressSink actor instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from temper.console import ProgressDisplay
from temper.run_info import RunInfo

#: The torchrun driver creates this file to ask the workers to stop (Ctrl-C).
STOP_FILE_ENV = "TEMPER_STOP_FILE"
#: ... and this one when it got a SIGTERM: save at the next step and exit (runtime/preempt.py).
PREEMPT_FILE_ENV = "TEMPER_PREEMPT_FILE"


class Reporter:
    def __init__(self, display: ProgressDisplay | None = None) -> None:
        self.display = display
        self.stop_file = os.environ.get(STOP_FILE_ENV)
        self.preempt_file = os.environ.get(PREEMPT_FILE_ENV)

    def progress(self, event: dict[str, Any]) -> None:
        if self.display is not None:
            self.display.update(event)

    def should_stop(self) -> bool:
        """Has the driver asked the job to stop? Asked on rank 0 at logging steps only."""
        return bool(self.stop_file) and os.path.exists(self.stop_file)

    def preempt_requested(self) -> bool:
        """Was the driver preempted (SIGTERM)? Polled by rank 0's preemption thread."""
        return bool(self.preempt_file) and os.path.exists(self.preempt_file)

    def on_sigterm(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (and nothing else) when this process gets SIGTERM; returns the undo.
        Only the main thread may set a signal handler: elsewhere nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: callback())
        return lambda: signal.signal(signal.SIGTERM, previous)

    def run_id(self, run_info: RunInfo) -> str | None:
        """The MLflow run the driver created after the job started (the server was down at
        start): it writes the id to `run_info.run_id_file`. Asked by the tracker's thread."""
        path = run_info.run_id_file
        if not path or not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip() or None

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
