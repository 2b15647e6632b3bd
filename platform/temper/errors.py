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
