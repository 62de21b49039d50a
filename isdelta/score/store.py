"""Per-model result folders: ``stats.jsonl`` written chunk by chunk, resumable, hash-guarded.

Layout of ``OUT/models/NAME/``::

    stamp        hash of what the scores depend on (the model entry and the data section)
    stats.jsonl  one line per corpus text, in corpus order, appended one chunk at a time
    done.json    written when every text is scored: counts, timings, tokenizer fingerprint

A rerun keeps the complete lines and scores only the texts after them; a torn last line (a
crash inside a write) is cut off first. A folder whose stamp differs is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from isdelta.outputs import atomic_write

__all__ = ["ModelStore", "StoreError", "stamp_of"]


class StoreError(RuntimeError):
    """A result folder that belongs to other settings; the message says how to proceed."""


def stamp_of(obj: Any) -> str:
    """A short hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ModelStore:
    """The result folder of one model.

    Parameters
    ----------
    folder : Path
    stamp : str
        :func:`stamp_of` the settings the scores depend on.
    """

    def __init__(self, folder: Path, stamp: str) -> None:
        self.folder, self.stamp = Path(folder), stamp
        self.stats_path = self.folder / "stats.jsonl"
        self.done_path = self.folder / "done.json"

    def open(self) -> int:
        """Create or check the folder; return how many texts are already scored."""
        self.folder.mkdir(parents=True, exist_ok=True)
        sp = self.folder / "stamp"
        if sp.exists() and sp.read_text().strip() != self.stamp:
            raise StoreError(
                f"{self.folder} holds scores of other settings (stamp {sp.read_text().strip()} vs "
                f"{self.stamp} now: the model entry or the data section changed). Give the model "
                "another models.N.name, pass --out NEW_DIR, or delete that folder to rescore."
            )
        sp.write_text(self.stamp + "\n")
        return self._complete_lines()

    def _complete_lines(self) -> int:
        """Number of complete lines in stats.jsonl, after cutting off a torn last line."""
        if not self.stats_path.exists():
            return 0
        with open(self.stats_path, "rb+") as f:
            end = _end_of_last_line(f)
            f.truncate(end)
            f.seek(0)
            n, last = 0, None
            for line in f:  # streamed: the file grows with the corpus
                n, last = n + 1, line
        if n:
            last = json.loads(last)
            if last["index"] != n - 1:
                raise StoreError(
                    f"{self.stats_path}: line {n} has index {last['index']}, expected {n - 1}; "
                    "the file is not this tool's output. Delete the folder to rescore."
                )
        return n

    @property
    def done(self) -> dict | None:
        return json.loads(self.done_path.read_text()) if self.done_path.exists() else None

    def append(self, rows: list[dict]) -> None:
        """Append rows with one write and an fsync (a chunk is on disk before the next is scored)."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(self.stats_path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, info: dict) -> None:
        atomic_write(self.done_path, json.dumps(info, indent=2, default=str))

    def columns(self, names: list[str]) -> tuple[list, dict[str, np.ndarray]]:
        """(ids, {name: float64 [n]}) read line by line; null values become NaN."""
        ids, cols = [], {n: [] for n in names}
        with open(self.stats_path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                ids.append(row["id"])
                for n in names:
                    v = row.get(n)
                    cols[n].append(np.nan if v is None else float(v))
        return ids, {n: np.asarray(v, dtype=np.float64) for n, v in cols.items()}


def _end_of_last_line(f, block: int = 1 << 16) -> int:
    """Byte offset just past the file's last newline (0 if none), scanning back from the end."""
    pos = f.seek(0, os.SEEK_END)
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        i = f.read(step).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0
