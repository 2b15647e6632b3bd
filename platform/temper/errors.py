"""User-facing error types.

Every mistake a user can make (bad spec, missing file, impossible combination) raises a
`TemperError` subclass whose message is one line per problem: where (field path or file),
what was found, and what is accepted. The CLI prints these without a traceback and exits 2.
"""

from __future__ import annotations


class TemperError(Exception):
    """A user-facing error: the message is shown as-is, without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = problems or [message]
        super().__init__(message)


class SpecError(TemperError):
    """The job spec (file, YAML or a --set override) is invalid; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems), problems=problems)


class MissingDependencyError(TemperError):
    """An optional dependency is needed for the requested feature."""

    def __init__(self, package: str, *, feature: str, extra: str | None = None) -> None:
        hint = f"pip install 'temper[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the '{package}' package: {hint}")


class JobFailedError(TemperError):
    """The training job ran and failed; the message carries the workers' root cause."""

    exit_code = 1


class JobPreemptedError(TemperError):
    """The job saved a checkpoint and stopped on a SIGTERM (fault.preemption_grace_s): not a
    failure; the same command resumes it. Exit code 75 (EX_TEMPFAIL: try again), so a
    RayJob or Kubernetes Job retry (backoffLimit) restarts it."""

    exit_code = 75


def root_cause(error: BaseException) -> tuple[str, str | None]:
    """The one line that names why `error` happened, and that cause's own traceback (None
    for our TemperErrors: their message is the whole story).

    Unwraps the DataLoader worker wrapper ("Caught X in DataLoader worker process N." with
    the original traceback in the message) to the original exception's message."""
    import traceback

    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        return _unwrap_loader_message(text)
    if isinstance(error, TemperError):
        return text.splitlines()[0] if text else type(error).__name__, None
    first = text.splitlines()[0] if text.strip() else ""
    line = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return line, "".join(traceback.format_exception(error, chain=False))


def _unwrap_loader_message(text: str) -> tuple[str, str | None]:
    """torch's ExceptionWrapper message -> (the original 'Type: message' line, its traceback)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Original Traceback"))
    original = lines[start:]
    frames = [i for i, line in enumerate(original) if line.startswith("  File ")]
    after = original[(frames[-1] + 1) if frames else 1:]
    cause = next((line for line in after if line and not line.startswith(" ")), original[-1])
    name, _, message = cause.partition(": ")
    if name.rsplit(".", 1)[-1] in _OUR_ERRORS and message:
        return message, None
    return cause, "\n".join(original) + "\n"


_OUR_ERRORS = {"TemperError", "SpecError", "MissingDependencyError", "JobFailedError"}


class WorkerFailedError(JobFailedError):
    """A worker failed: "rank R: <root cause>"; `traceback` is the cause's own (None for ours)."""

    def __init__(self, message: str, *, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback

    def __reduce__(self):  # crosses Ray's pickling with its traceback
        return (_rebuild_worker_failed, (str(self), self.traceback))


def _rebuild_worker_failed(message: str, traceback: str | None) -> WorkerFailedError:
    return WorkerFailedError(message, traceback=traceback)
