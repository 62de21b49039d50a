"""The programs' exit codes and the errors that carry a message for the user (no traceback).

Every anticipated failure is one line, ``error: <what> — <why> — <fix>``, naming the file, the
config key or the data row, and exits with a code of :class:`ExitCode`. The library never
imports this module: the programs translate the library's exceptions where they know the key
(a model that does not load is ``model.path``, a prompt past the context is a data row).
"""

from __future__ import annotations

import enum

__all__ = ["EXIT_CODES", "ConfigError", "ExitCode", "OutputFolderError", "ProgramError"]


class ExitCode(enum.IntEnum):
    """What a program's exit status means (also printed by ``--help``)."""

    OK = 0
    UNEXPECTED = 1  # a bug: one line on the terminal, the traceback in OUT/error.log
    BAD_INPUT = 2  # config, --set, data file, model path or device, --out: fix the input and rerun
    NOTHING_TO_MEASURE = 3  # e.g. the update did not change the model: no ΔH to report
    OUTPUT_FOLDER = 4  # the output folder is damaged, unverifiable, or in use by another run
    INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was saved stays; the same command resumes


EXIT_CODES = {
    ExitCode.OK: "done",
    ExitCode.UNEXPECTED: "unexpected error, a bug: please report it with OUT/error.log (the traceback)",
    ExitCode.BAD_INPUT: "bad input: the config, a --set value, the data file, a model path or device, --out",
    ExitCode.NOTHING_TO_MEASURE: "nothing to measure (the update did not change the model)",
    ExitCode.OUTPUT_FOLDER: "the output folder is damaged, cannot be verified, or is in use by another run",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGTERM): saved parts are kept; the same command resumes",
}


class ProgramError(Exception):
    """An anticipated failure: printed as ``error: <what> — <why> — <fix>``, exit ``code``.

    Parameters
    ----------
    what : str
        The file, key or row, and what is wrong with it.
    why : str, optional
        The cause, or what the program found.
    fix : str, optional
        What the user can do.
    code : ExitCode, optional
        Default: the class's ``code`` (bad input).
    """

    code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, what: str, why: str | None = None, fix: str | None = None, *, code: int | None = None):
        super().__init__(" — ".join(p.strip() for p in (what, why, fix) if p))
        if code is not None:
            self.code = ExitCode(code)


class ConfigError(ProgramError, ValueError):
    """A config file, override or model setting that does not validate; names each key path."""


class OutputFolderError(ProgramError):
    """An output folder that cannot be used as it is: damaged, unverifiable, or locked."""

    code = ExitCode.OUTPUT_FOLDER
