"""vLLM's own failures, named: :class:`SamplerEngineError` with vLLM's version and the root cause.

vLLM runs its engine in child processes. When one dies, the main process gets ``EngineDeadError:
EngineCore encountered an issue. See stack trace (above) for the root cause.`` and nothing more:
the cause (``RuntimeError: Unsupported CPU attention configuration: head_dim=16 ...``) was printed
by the child, to its stdout (vLLM's log) and stderr (the traceback). So the children's stdout and
stderr pass through pipes whose last lines are kept (:class:`OutputTail`), and :func:`engine_error`
takes the cause from the exception's chain, or else from those lines.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = ["FALLBACK", "OutputTail", "SamplerEngineError", "engine_error"]

FALLBACK = "sample with the HF back end instead (sampling.backend: hf in a run config; backend='hf' in sample)"
# vLLM's messages that only point elsewhere ("see the stack trace above"): never a root cause
_WRAPPERS = ("EngineCore encountered an issue", "Engine core initialization failed", "Worker failed with error")
# an exception line of a traceback, after vLLM's log prefix "(Worker pid=1) ERROR 12-06 21:32:24 [file.py:1] "
_EXC_LINE = re.compile(r"(?:^|\] |\) )((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")


class SamplerEngineError(RuntimeError):
    """vLLM itself failed (to start, or while sampling): a limit or fault of the engine, not of isdelta.

    Attributes
    ----------
    engine : str
        ``"vLLM <version>"``.
    cause : str
        The first line of the root cause, e.g. ``"RuntimeError: Unsupported CPU attention
        configuration: head_dim=16 isa=2 kv_cache_idx=0"``.
    """

    def __init__(self, engine: str, stage: str, cause: str) -> None:
        self.engine, self.cause = engine, cause
        super().__init__(
            f"{engine} failed {stage}: {cause} — the sampling engine's own failure, not isdelta's (this vLLM build "
            f"does not support this model or setting, or its engine process died) — {FALLBACK}"
        )


def engine_error(e: Exception, stage: str, tail: OutputTail | None) -> NoReturn:
    """Raise ``e`` as a :class:`SamplerEngineError` (``stage``: "while sampling", "to start on ..."),
    or ``e`` itself when it is not the engine's to explain (out of memory keeps its own handling)."""
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        raise e
    version = getattr(sys.modules.get("vllm"), "__version__", None)
    raise SamplerEngineError(f"vLLM {version}" if version else "vLLM", stage, root_cause(e, tail)) from e


def root_cause(e: BaseException, tail: OutputTail | None) -> str:
    """The first line of the root cause: the deepest specific message of ``e``'s chain, else the
    first exception line the engine processes printed (their errors never reach this process)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(chain):
        first = (str(exc).strip().splitlines() or [""])[0]
        if first and not any(w in first for w in _WRAPPERS):
            return f"{type(exc).__name__}: {first}"[:500]
    if tail is not None:
        found = tail.wait_for(printed_cause, timeout=5.0)  # the pipe may lag the exception a little
        if found:
            return found
    first = (str(chain[0]).strip().splitlines() or [""])[0]
    return f"{type(chain[0]).__name__}: {first} (no further cause was printed)"


def printed_cause(lines: Sequence[str]) -> str | None:
    """The first exception line of a traceback in ``lines`` that is not a wrapper; else the error a
    wrapper quotes ("Worker failed with error '...'"); else None."""
    quoted = None
    for line in lines:
        m = _EXC_LINE.search(line.rstrip())
        if not m:
            continue
        name, msg = m.group(1).rsplit(".", 1)[-1], m.group(2)
        if not any(w in msg for w in _WRAPPERS):
            return f"{name}: {msg}"[:500]
        q = re.search(r"with error '(.+)'", msg)
        quoted = quoted or (f"{name}: {q.group(1)}"[:500] if q else None)
    return quoted


class OutputTail:
    """The stdout and stderr of the processes vLLM starts, passed through to this process's own,
    their last lines kept: an engine process that dies prints its error there and nowhere else
    (vLLM logs to stdout, Python prints tracebacks to stderr).

    Between :meth:`attach` and :meth:`detach` file descriptors 1 and 2 are pipes, so every process
    started meanwhile inherits them; a thread per pipe copies what arrives to the original. After
    :meth:`detach` this process writes to its own stdout and stderr again; a pipe closes when the
    last engine process exits.
    """

    FDS = (1, 2)

    def __init__(self, keep: int = 2000) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []

    def attach(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in self.FDS:
            self._saved[fd] = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)  # fd holds the write end now (and so does every process started from here)
            t = threading.Thread(target=self._pump, args=(r, os.dup(self._saved[fd])), daemon=True)
            t.start()
            self._threads.append(t)

    def detach(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = {}

    def wait(self, timeout: float) -> None:
        """Until every writer closed the pipes (the engine processes exited), or ``timeout`` seconds."""
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    def wait_for(self, find: Callable[[list[str]], str | None], timeout: float) -> str | None:
        """``find(lines)`` once it is not None, polling until ``timeout`` seconds or the pipes close."""
        end = time.monotonic() + timeout
        while True:
            found = find(list(self.lines))
            alive = any(t.is_alive() for t in self._threads)
            if found is not None or not alive or time.monotonic() > end:
                return found
            time.sleep(0.05)

    def _pump(self, r: int, out: int) -> None:
        rest = b""
        try:
            while chunk := os.read(r, 65536):  # b"": every writer has closed the pipe
                _write_all(out, chunk)
                *done, rest = (rest + chunk).split(b"\n")
                self.lines.extend(x.decode("utf-8", "replace") for x in done)
        finally:
            if rest:
                self.lines.append(rest.decode("utf-8", "replace"))
            os.close(r)
            os.close(out)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a pipe or terminal may take part of it)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:  # the original stderr is gone: keep reading, so the engine never blocks
            return
