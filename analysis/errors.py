"""Every error that is the user's to fix, in one module.

The command line turns any :class:`EnergyatError` into one line on stderr and exit code 2
(``study/cli.py``); anything else is a bug and keeps its traceback. The message templates
live here so that each says what was wrong, what was expected and what to do, in one voice.
"""

from __future__ import annotations


class EnergyatError(Exception):
    """Bad input: a spec, a flag, a path or stored data the user can fix. Exit code 2.

    Picklable as its message, whatever a subclass's constructor takes: Ray ships a trial's
    exception to the driver by pickling it, and an error that cannot be rebuilt there arrives
    as a TypeError about constructor arguments instead of its own message.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), str(self)), dict(self.__dict__))


def _rebuild(cls: type[EnergyatError], message: str) -> EnergyatError:
    error = EnergyatError.__new__(cls)
    Exception.__init__(error, message)
    return error


class SpecError(EnergyatError):
    """A spec key is unknown or its value is invalid."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"spec key `{key}`: {problem}")


class DataNotFoundError(EnergyatError):
    """A dataset's files are missing and downloading is off."""

    def __init__(self, name: str, root: str, expected: str) -> None:
        super().__init__(
            f"dataset `{name}` not found under {root} (expected {expected}); "
            "set `dataset.download: true` to fetch it or point `dataset.root` at a copy"
        )


class StoreError(EnergyatError):
    """A study directory or one of its tables is missing or unreadable."""


class QueryError(EnergyatError):
    """A SQL query was rejected or failed."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow's and DuckDB's span several)."""
    return " ".join(str(exc).split())


def unknown_choice(key: str, value: object, choices: object) -> SpecError:
    """The one template for 'value not among the allowed choices'."""
    allowed = ", ".join(sorted(str(c) for c in choices))  # type: ignore[attr-defined]
    return SpecError(key, f"unknown value {value!r}; choose one of: {allowed}")
