"""One command line for both programs, and its error boundary.

``main(Program, argv)`` parses ``prog CONFIG.yaml [--set KEY=VALUE ...] [--out DIR]``, loads the
config and runs the program. Whatever happens, the terminal gets one readable line, never a
traceback:

- an anticipated failure (:class:`ProgramError`, or a library exception the program maps in
  ``Program.errors``) prints ``error: <what> — <why> — <fix>`` and exits with its code;
- Ctrl-C (or SIGTERM) stops the run at the next safe point (:mod:`isdelta.program.interrupts`),
  prints what was saved and that the same command resumes, exit 130;
- anything else is a bug: one line plus "please report", the traceback in ``OUT/error.log`` (or a
  temporary file when the output folder is unknown or not writable), exit 1.

The exit codes are :class:`isdelta.program.errors.ExitCode`; ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from isdelta.program import interrupts
from isdelta.program.errors import EXIT_CODES, ExitCode, ProgramError
from isdelta.program.ranks import is_root, ranks

__all__ = ["Program", "main", "stage"]


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Announce a stage on stderr and record its wall time in ``timings[name]`` (under torchrun,
    rank 0 alone announces)."""
    loud = is_root()
    interrupts.check()  # a stage boundary is a safe point
    if loud:
        print(f"[isdelta] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    interrupts.check()
    timings[name] = time.perf_counter() - t0
    if loud:
        print(f"[isdelta] {name} done in {timings[name]:.1f} s", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Program:
    """A command line: ``prog CONFIG.yaml [--set KEY=VALUE ...] [--out DIR]``.

    Attributes
    ----------
    prog, description : what ``--help`` shows.
    set_example : an override for the ``--set`` help, e.g. ``update.lr=1e-4``.
    load : (config path, overrides) -> config.
    execute : (config, output folder or None) -> anything (the folder defaults to ``output.dir``).
    errors : library exception type -> (exit code, message prefix): anticipated failures of the
        library, printed as ``error: <prefix><message>``. The program's own are ProgramErrors.
    progress : (config, output folder) -> lines saying what the folder holds (for Ctrl-C).
    """

    prog: str
    description: str
    set_example: str
    load: Callable[[str, Sequence[str]], Any]
    execute: Callable[[Any, Path | None], Any]
    errors: Mapping[type[BaseException], tuple[int, str]] = dataclasses.field(default_factory=dict)
    progress: Callable[[Any, Path], list[str]] | None = None


def _parser(program: Program) -> argparse.ArgumentParser:
    codes = "\n".join(f"  {int(c):>3}  {text}" for c, text in EXIT_CODES.items())
    ap = argparse.ArgumentParser(
        prog=program.prog,
        description=program.description,
        epilog="exit codes:\n" + codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("config", help="the YAML config (see configs/)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {program.set_example} (repeatable)",
    )
    ap.add_argument("--out", help="output folder (default: output.dir of the config)")
    return ap


def main(program: Program, argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the config, run the program; return the exit code.

    Under ``torchrun`` every rank runs this; the ranks join one process group first and agree
    on the config (:mod:`isdelta.program.ranks`).
    """
    args = _parser(program).parse_args(argv)
    cfg = group = None
    with interrupts.handled(), _one_line_warnings():
        try:
            group = ranks()  # one process: no group to join
            cfg = group.agree(lambda: program.load(args.config, args.set))
            program.execute(cfg, Path(args.out) if args.out else None)
            interrupts.check()  # a signal swallowed after the last safe point still stops with 130
        except KeyboardInterrupt:
            return _interrupted(program, cfg, _out(cfg, args.out))
        except ProgramError as e:
            return _fail(str(e), e.code, quiet=getattr(e, "quiet", False))
        except tuple(program.errors) as e:
            code, prefix = next(v for t, v in program.errors.items() if isinstance(e, t))
            return _fail(f"{prefix}{e}", code, quiet=getattr(e, "quiet", False))
        except MemoryError as e:  # torch.OutOfMemoryError too (a RuntimeError; matched by name below)
            return _out_of_memory(e)
        except OSError as e:  # a file of the output folder in the way (a folder where a file goes), a full disk
            where = _in_folder(e, _out(cfg, args.out))
            if where is None:
                return _unexpected(program, e, _out(cfg, args.out), argv)
            return _fail(
                f"{where} cannot be written or read — {e.strerror or type(e).__name__} — move it away or free "
                "space (or pass --out NEW_DIR), then rerun the same command: the saved parts are reused",
                ExitCode.OUTPUT_FOLDER,
            )
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                return _out_of_memory(e)
            return _unexpected(program, e, _out(cfg, args.out), argv)
        finally:
            if group is not None:
                group.close()
    return ExitCode.OK


def _fail(message: str, code: int, quiet: bool = False) -> int:
    """Print ``error: message`` (unless another rank prints it: ``quiet``); return ``code``."""
    if quiet:
        return int(code)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    who = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    print(f"error{who}: {message}", file=sys.stderr)
    return int(code)


def _out(cfg, out: str | None) -> Path | None:
    """The output folder, once known."""
    if out:
        return Path(out)
    folder = getattr(getattr(cfg, "output", None), "dir", None)
    return Path(folder) if folder else None


def _in_folder(e: OSError, out: Path | None) -> Path | None:
    """The path of the output folder that an OSError is about (the target of a rename first),
    or None when it is about no path there."""
    if out is None:
        return None
    root = out.resolve()
    for name in (e.filename2, e.filename):
        if name is None:
            continue
        path = Path(os.fsdecode(name)).resolve()
        if path == root or root in path.parents:
            return path
    return None


def _out_of_memory(e: BaseException) -> int:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _fail(
        f"out of memory — {first[:200]} — lower engine.token_budget (and sampling.prompts_per_batch), "
        "or use a smaller model or dtype; the same command resumes from the saved parts",
        ExitCode.BAD_INPUT,
    )


def _interrupted(program: Program, cfg, out: Path | None) -> int:
    if not is_root():  # torchrun passes Ctrl-C to every rank: rank 0 says what was saved
        return ExitCode.INTERRUPTED
    saved: list[str] = []
    if cfg is not None and out is not None and program.progress is not None:
        try:
            saved = program.progress(cfg, out)
        except Exception:  # a report of progress must not turn an interrupt into a crash
            saved = []
    if saved:
        what = f"saved in {out}: " + "; ".join(saved)
        print(f"interrupted — {what} — rerun the same command to resume from them", file=sys.stderr)
    else:
        print("interrupted — nothing was saved yet — rerun the same command to start again", file=sys.stderr)
    return ExitCode.INTERRUPTED


def _unexpected(program: Program, exc: BaseException, out: Path | None, argv) -> int:
    """One line and the log's path on the terminal; the traceback in the log."""
    if getattr(exc, "quiet", False):  # a lower rank failed the same way and reports it
        return ExitCode.UNEXPECTED
    log = _write_log(program, exc, out, argv)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    where = f"the traceback is in {log}" if log else "no log could be written"
    print(
        f"error: unexpected {type(exc).__name__}: {first} — this is a bug in isdelta — "
        f"please report it to the isdelta maintainers with your config and that log; {where}",
        file=sys.stderr,
    )
    return ExitCode.UNEXPECTED


def _write_log(program: Program, exc: BaseException, out: Path | None, argv) -> Path | None:
    from isdelta.outputs import versions

    text = (
        f"{program.prog} {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"at {datetime.datetime.now().isoformat(timespec='seconds')}, pid {os.getpid()}\n"
        f"versions: {versions()}\n\n" + "".join(traceback.format_exception(exc))
    )
    candidates = [out / "error.log"] if out is not None and out.is_dir() else []
    for path in candidates:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text + "\n")
            return path
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix="isdelta-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as ``[isdelta] warning: <message>`` (the source line Python adds reads like a
    traceback to a user)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"[isdelta] warning: {message}", file=file or sys.stderr, flush=True)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
