"""The output folder one program run owns: created, locked, stamped, and its saved parts verified.

Layout added to a program's own files::

    .lock        held (``flock``) while a run writes the folder; the holder's pid inside
    parts.json   the manifest: the folder's stamp (program, config hash, data hash) and, per saved
                 part, its sha256 and the identity of the inputs it was computed from
    config_hash  the config hash, for people (the manifest is what is checked)

A rerun resumes only from parts whose checksum and inputs match; a damaged or foreign part is
named on stderr, deleted and recomputed (every part is a deterministic function of the config,
the data and the parts before it). A folder stamped with another config, other data or by the
other program is refused, never mixed. The lock is released when the process ends, however it
ends (the kernel drops an ``flock`` with its holder), so a killed run never blocks the next one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from isdelta.outputs import atomic_write, file_sha256
from isdelta.program import interrupts
from isdelta.program.errors import ConfigError, OutputFolderError, ProgramError

__all__ = ["MANIFEST", "OutputFolder", "folder_lock", "make_folder", "note", "stamp_of"]

LOCK = ".lock"
MANIFEST = "parts.json"
_VERSION = 1


def note(message: str) -> None:
    """A line on stderr about something the program did on its own (deleted, recomputed)."""
    print(f"[isdelta] note: {message}", file=sys.stderr, flush=True)


def stamp_of(obj: Any) -> str:
    """A short hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_folder(path: Path, key: str) -> Path:
    """Create ``path`` (and its parents); a path under a file or where one cannot write is a
    ConfigError naming ``key`` (``--out`` or ``output.dir``)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"{key} {path}: cannot create the output folder",
            "it, or a folder above it, is a file",
            "choose another folder, e.g. --out runs/NAME",
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{key} {path}: cannot create the output folder", e.strerror, "choose a folder you can write"
        ) from None
    return path


@contextmanager
def folder_lock(path: Path, key: str) -> Iterator[None]:
    """Hold ``path/.lock`` exclusively for the block; a second run is refused, naming the holder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented)
        yield
        return
    lock = path / LOCK
    if lock.exists() and not lock.is_file():
        raise OutputFolderError(
            f"output folder {path}: {LOCK} is a {_kind(lock)}, not isdelta's lock file",
            "a run holds the folder by locking that file, so it cannot start",
            f"delete it (rm -r {lock}), then rerun the same command",
        )
    try:
        f = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise ConfigError(
            f"{key} {path}: cannot write in the output folder", e.strerror, "choose a folder you can write"
        ) from None
    with f:  # closing the file releases the lock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputFolderError(
                f"output folder {path} is in use by another isdelta run ({holder})",
                "two runs writing one folder would corrupt it",
                "wait until that run ends, or pass --out NEW_DIR (a killed run frees the folder by itself)",
            ) from None
        f.seek(0)
        f.truncate()
        now = datetime.datetime.now().isoformat(timespec="seconds")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {now}\n")
        f.flush()
        yield


class OutputFolder:
    """The folder a run writes, as a context manager: created, locked, stamp checked.

    Parameters
    ----------
    path : Path
    key : str
        How the user named it (``--out`` or ``output.dir``), for messages.
    program : str
        The program's name; a folder stamped by another program is refused.
    stamp : dict with "config" and "data"
        Hashes of the config and of the data's content.
    results : sequence of str
        The program's result files and folders (relative): present without a manifest, they
        were written by an older isdelta (or the manifest was lost) and cannot be verified.
    error : ProgramError subclass
        Raised (exit code 2) when the folder holds another config's or other data's results.
    """

    def __init__(
        self,
        path: Path,
        key: str,
        program: str,
        stamp: dict[str, str],
        results: Sequence[str],
        error: type[ProgramError] = ConfigError,
    ) -> None:
        self.path, self.key, self.program, self.stamp = Path(path), key, program, dict(stamp)
        self.results, self.error = tuple(results), error
        self._parts: dict[str, dict] = {}
        self._stack = ExitStack()

    # ------------------------------------------------------------------ opening
    def __enter__(self) -> OutputFolder:
        make_folder(self.path, self.key)
        with ExitStack() as stack:
            stack.enter_context(folder_lock(self.path, self.key))
            self._remove_temporaries()
            self._check_stamp()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _remove_temporaries(self) -> None:
        """Temporary files of atomic writes that a killed run left behind (we hold the lock)."""
        for tmp in self.path.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _read_manifest(self) -> tuple[dict | None, str | None]:
        path = self.path / MANIFEST
        if not path.exists():
            return None, "missing"
        if not path.is_file():
            return None, f"a {_kind(path)}, not a file"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(m, dict) and m.get("version") == _VERSION and isinstance(m.get("parts"), dict)):
                raise ValueError("not a manifest of this isdelta")
            if not isinstance(m.get("stamp"), dict):
                raise ValueError("no stamp")
            return m, None
        except (ValueError, UnicodeDecodeError) as e:
            return None, f"damaged ({e})"
        except OSError as e:
            return None, f"unreadable ({e.strerror})"

    def _check_stamp(self) -> None:
        manifest, problem = self._read_manifest()
        if manifest is None:
            self._adopt(problem)
        else:
            self._compare(manifest)
            self._parts = self._valid_entries(manifest["parts"])
        for name in (MANIFEST, "config_hash"):  # rewritten below: whatever is in the way goes
            if (self.path / name).exists() and not (self.path / name).is_file():
                note(f"{self.path}: {name} is a {_kind(self.path / name)}, not a file — deleting it")
                _remove(self.path / name)
        atomic_write(self.path / "config_hash", self.stamp["config"] + "\n")
        self._save()

    def _valid_entries(self, parts: dict) -> dict[str, dict]:
        """The manifest's entries that are records (a checksum and the inputs' identity); a
        damaged entry is dropped with a note, so its part is recomputed."""
        good = {}
        for name, entry in parts.items():
            ok = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("sha256", "inputs"))
            if ok and _inside(name):
                good[name] = entry
            else:
                note(f"{self.path}: the entry for {name!r} in {MANIFEST} is damaged — its part will be recomputed")
        return good

    def _adopt(self, problem: str) -> None:
        """No readable manifest: a new folder, or results that cannot be verified."""
        present = [n for n in self.results if (self.path / n).exists()]
        if not present:
            return
        hash_file = self.path / "config_hash"
        same = hash_file.exists() and hash_file.read_text(errors="replace").strip() == self.stamp["config"]
        if not same:
            raise OutputFolderError(
                f"output folder {self.path} holds results ({', '.join(present)}) that cannot be verified",
                f"{MANIFEST} is {problem}, and config_hash does not show this config either",
                f"pass --out NEW_DIR, or delete {self.path} to start over",
            )
        note(
            f"{self.path}: {MANIFEST} is {problem} (written by an older isdelta, or lost), so the saved "
            f"parts of this config cannot be verified — deleting {', '.join(present)}; they will be recomputed"
        )
        for name in present:
            _remove(self.path / name)

    def _compare(self, manifest: dict) -> None:
        """Refuse a folder whose saved parts came from another program, config or data (a stamp
        with no part saved, e.g. after a run that failed its checks, blocks nothing)."""
        if not manifest["parts"]:
            return
        old, new = manifest["stamp"], self.stamp
        fix = f"pass --out NEW_DIR, or delete {self.path} to start over"
        if manifest.get("program", self.program) != self.program:
            raise self.error(
                f"output folder {self.path} holds results of {manifest['program']}", "not of " + self.program, fix
            )
        if old.get("config") != new["config"]:
            raise self.error(
                f"output folder {self.path} holds results of a different config",
                f"config hash {old.get('config')} there, {new['config']} now; isdelta never mixes them",
                fix,
            )
        if old.get("data") != new["data"]:
            raise self.error(
                f"output folder {self.path} holds results for other data",
                f"the data's content changed since they were saved (hash {old.get('data')} there, "
                f"{new['data']} now), so its samples are not samples of these prompts",
                fix,
            )

    def _save(self) -> None:
        body = {"version": _VERSION, "program": self.program, "stamp": self.stamp, "parts": self._parts}
        atomic_write(self.path / MANIFEST, json.dumps(body, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ parts
    def verified(self, *names: str, inputs: str) -> bool:
        """Whether the saved part (its files ``names``) can be reused: every file present, its
        checksum as recorded, computed from ``inputs``. A damaged or foreign part is named on
        stderr and deleted (it is recomputed); a part never saved returns False quietly."""
        files = [self.path / n for n in names]
        if not any(f.exists() for f in files):
            self._forget(names)
            return False
        problem = None
        for name, f in zip(names, files):
            entry = self._parts.get(name)
            if not f.exists():
                problem = f"{name} is missing"
            elif not f.is_file():
                problem = f"{name} is a {_kind(f)}, not a file"
            elif entry is None:
                problem = f"{name} is not in {MANIFEST} (a run was stopped before recording it)"
            elif entry.get("inputs") != inputs:
                problem = f"{name} was computed from other inputs (a part before it was recomputed)"
            elif file_sha256(f) != entry.get("sha256"):
                problem = f"{name} is damaged (its checksum differs from the one in {MANIFEST})"
            if problem:
                break
        if problem is None:
            return True
        self.discard(names, problem)
        return False

    def load(self, names: str | Sequence[str], inputs: str, reader: Callable[[Path], Any]) -> Any | None:
        """``reader(path of the first file)`` of a verified part (one file, or several read
        together), else None: damaged, foreign or unreadable, it is deleted and said so."""
        names = (names,) if isinstance(names, str) else tuple(names)
        if not self.verified(*names, inputs=inputs):
            return None
        try:
            return reader(self.path / names[0])
        except Exception as e:  # a file that passed its checksum but this isdelta cannot read
            self.discard(names, f"{names[0]} cannot be read ({type(e).__name__}: {str(e)[:120]})")
            return None

    def record(self, *names: str, inputs: str) -> None:
        """Record the checksums of files just written, computed from ``inputs``."""
        for n in names:
            self._parts[n] = {"sha256": file_sha256(self.path / n), "inputs": inputs}
        self._save()
        interrupts.check()  # a part just saved: a safe point to stop at

    def digest(self, *names: str) -> str:
        """The identity of recorded parts (their checksums), as inputs of the parts after them."""
        return stamp_of([self._parts[n]["sha256"] for n in names])

    def subfolder(self, name: str) -> Path:
        """``path/name`` as a folder (created; a file in its place is deleted with a note)."""
        sub = self.path / name
        if sub.exists() and not sub.is_dir():
            note(f"{self.path}: {name} is a {_kind(sub)}, not a folder — deleting it")
            _remove(sub)
        sub.mkdir(parents=True, exist_ok=True)
        return sub

    def recorded(self) -> list[str]:
        """Names of the recorded parts."""
        return sorted(self._parts)

    def discard(self, names: Sequence[str], why: str) -> None:
        """Delete a part's files and forget them, saying why on stderr."""
        note(f"{self.path}: {why} — deleting {', '.join(names)}; it will be recomputed")
        for n in names:
            _remove(self.path / n)
        self._forget(names)

    def _forget(self, names: Sequence[str]) -> None:
        if any(self._parts.pop(n, None) is not None for n in list(names)):
            self._save()


def _kind(path: Path) -> str:
    """What is at ``path``, in a word, for messages."""
    return "folder" if path.is_dir() else "file" if path.is_file() else "special file"


def _inside(name: str) -> bool:
    """A manifest name that stays inside the folder (no absolute path, no ``..``)."""
    return not Path(name).is_absolute() and ".." not in Path(name).parts


def _remove(path: Path) -> None:
    """Delete a file or folder; one that cannot be deleted is refused with its name."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise OutputFolderError(
            f"{path} cannot be deleted", e.strerror, f"delete {path} by hand, then rerun the same command"
        ) from None
