"""Signal handling shared by the driver and the launchers that own the main thread."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable


@contextlib.contextmanager
def sigterm_interrupts(on_sigterm: Callable[[], None] | None = None):
    """SIGTERM (`temper stop`, Ray's stop_job, a pod deleted) stops the job like Ctrl-C: the
    run is marked KILLED and the workers are stopped. With `on_sigterm` (a preemption: save
    and exit, fault.preemption_grace_s) the first SIGTERM calls it instead, a second one
    interrupts. Main thread only (signal rule). Ray's driver installs its own SIGTERM handler
    (exit) in ray.init: the ray launcher enters this again once Ray is up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    calls: list[int] = []

    def handler(signum, frame) -> None:
        calls.append(signum)
        if on_sigterm is None or len(calls) > 1:
            raise KeyboardInterrupt("stopped by SIGTERM (temper stop, or the cluster)")
        on_sigterm()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
