"""Signal handling shared by the driver and the launchers that own the main thread."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (`temper stop`, Ray's stop_job, a pod deleted) stops the job like Ctrl-C: the
    run is marked KILLED and the workers are stopped. Main thread only (signal rule). Ray's
    driver installs its own SIGTERM handler (exit) in ray.init: the ray launcher enters this
    again once Ray is up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame) -> None:
        raise KeyboardInterrupt("stopped by SIGTERM (temper stop, or the cluster)")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
