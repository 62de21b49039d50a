"""Per-model result folders: ``stats.jsonl`` written chunk by chunk, resumable, verified.

Layout of ``OUT/models/NAME/``::

    stamp         JSON: the hash of what the scores depend on (the model entry and the data
                  section), of the corpus file's content and of the model's files (its content
                  identity: a model rewritten in place is rescored)
    stats.jsonl   one line per corpus text, in corpus order, appended one chunk at a time
    chunks.jsonl  per appended chunk: its end offset in stats.jsonl, its line count and sha256
    done.json     written when every text is scored: counts, timings, tokenizer fingerprint

A rerun keeps the chunks whose checksums match and scores only the texts after them: a torn
write (a crash inside an append) is cut off quietly, a damaged chunk is named on stderr and cut
off with everything after it. A folder stamped with other settings or another corpus is
refused, never mixed; a folder from an older isdelta (a plain-text stamp, no chunk checksums)
with the same settings is rescored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from isdelta.outputs import atomic_write
from isdelta.program import ExitCode, ProgramError, note, stamp_of

__all__ = ["ModelStore", "StoreError", "stamp_of"]

_VERSION = 2


class StoreError(ProgramError, RuntimeError):
    """A result folder that belongs to other settings (exit 2), or is damaged beyond repair (4)."""


class ModelStore:
    """The result folder of one model.

    Parameters
    ----------
    folder : Path
    settings : str
        :func:`stamp_of` the settings the scores depend on.
    corpus : str
        Hash of the corpus file's content.
    model : str
        The model's content identity (:func:`isdelta.program.identity.model_identity`): scores of
        a model whose files changed since are deleted and rescored, with a note.
    """

    def __init__(self, folder: Path, settings: str = "", corpus: str = "", model: str = "") -> None:
        self.folder = Path(folder)
        self.stamp = {"version": _VERSION, "settings": settings, "corpus": corpus, "model": model}
        self.stats_path = self.folder / "stats.jsonl"
        self.chunks_path = self.folder / "chunks.jsonl"
        self.done_path = self.folder / "done.json"
        self.done: dict | None = None

    # ------------------------------------------------------------------ opening
    def open(self) -> int:
        """Create or check the folder; return how many texts are already scored (verified)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_stamp()
        n = self._verify()
        self.done = self._check_done(n)
        return n

    def _has_scores(self) -> bool:
        return self.stats_path.exists() or self.done_path.exists()

    def _check_stamp(self) -> None:
        sp = self.folder / "stamp"
        text = sp.read_text(errors="replace").strip() if sp.exists() else ""
        try:
            old = json.loads(text) if text else None
        except ValueError:
            old = None
        if isinstance(old, dict) and old.get("version") == _VERSION:
            self._compare(old)
        elif re.fullmatch(r"[0-9a-f]{16}", text):  # an older isdelta: settings only, no checksums
            if text != self.stamp["settings"]:
                self._compare({"settings": text})
            note(
                f"{self.folder}: scored by an older isdelta (no corpus hash, no checksums), so they "
                "cannot be verified — deleting them; every text will be rescored"
            )
            self.clear()
        elif self._has_scores():
            state = "damaged" if text else ("empty" if sp.exists() else "missing")
            if not self._stamp_in_done():
                raise StoreError(
                    f"{sp} is {state}",
                    "the scores beside it cannot be matched to any settings",
                    f"delete {self.folder} to rescore that model",
                    code=ExitCode.OUTPUT_FOLDER,
                )
            note(f"{sp} is {state}; done.json shows these settings and this corpus — rewriting it")
        atomic_write(sp, json.dumps(self.stamp) + "\n")

    def _compare(self, old: dict) -> None:
        fix = "give the model another models.N.name, pass --out NEW_DIR, or delete that folder to rescore"
        if old.get("settings") != self.stamp["settings"]:
            raise StoreError(
                f"{self.folder} holds scores of other settings",
                f"stamp {old.get('settings')} vs {self.stamp['settings']} now: the model entry or the data section changed",
                fix,
            )
        if old.get("corpus") != self.stamp["corpus"]:
            raise StoreError(
                f"{self.folder} holds scores of another corpus",
                f"the content of data.path changed since (hash {old.get('corpus')} there, {self.stamp['corpus']} now)",
                fix,
            )
        if old.get("model") != self.stamp["model"] and self._has_scores():
            note(
                f"{self.folder}: the model's files changed since these texts were scored (content identity "
                f"{old.get('model') or 'not recorded'} there, {self.stamp['model']} now) — deleting its scores; "
                "every text will be rescored"
            )
            self.clear()

    def _stamp_in_done(self) -> bool:
        """A damaged stamp is rewritten when done.json shows these settings and this corpus."""
        try:
            return json.loads(self.done_path.read_text()).get("stamp") == self.stamp
        except (OSError, ValueError, AttributeError):
            return False

    def clear(self) -> None:
        """Forget every saved text (the stamp stays): the folder is written again from the start."""
        for p in (self.stats_path, self.chunks_path, self.done_path):
            p.unlink(missing_ok=True)
        self.done = None

    def _read_chunks(self) -> list[dict]:
        """The chunk records, up to the first unreadable line (a torn write)."""
        out = []
        if not self.chunks_path.exists():
            return out
        for line in self.chunks_path.read_text(errors="replace").splitlines():
            try:
                c = json.loads(line)
                out.append({"end": int(c["end"]), "lines": int(c["lines"]), "sha256": str(c["sha256"])})
            except (ValueError, KeyError, TypeError):
                break
        return out

    def _verify(self) -> int:
        """Keep the chunks whose bytes match their checksums; cut stats.jsonl after the last one."""
        chunks = self._read_chunks()
        good, end, n, problem = [], 0, 0, None
        size = self.stats_path.stat().st_size if self.stats_path.exists() else 0
        with open(self.stats_path, "rb") if size else io.BytesIO() as f:
            for j, c in enumerate(chunks):
                data = f.read(max(c["end"] - end, 0))
                if len(data) != c["end"] - end or hashlib.sha256(data).hexdigest() != c["sha256"]:
                    problem = f"chunk {j} (texts {n}…{n + c['lines'] - 1}) is damaged or missing"
                    break
                good.append(c)
                end, n = c["end"], n + c["lines"]
        if problem:
            note(f"{self.stats_path}: {problem} — cutting it there; the texts from {n} on will be rescored")
        if end < size or len(good) < len(chunks):  # an unrecorded tail (killed inside an append) or damage
            with open(self.stats_path, "rb+") as f:
                f.truncate(end)
        if len(good) < len(chunks):
            atomic_write(self.chunks_path, "".join(json.dumps(c) + "\n" for c in good))
        return n

    def _check_done(self, n: int) -> dict | None:
        """done.json when it matches the verified stats; else it is deleted (scoring goes on)."""
        if not self.done_path.exists():
            return None
        try:
            done = json.loads(self.done_path.read_text())
            ok = isinstance(done, dict) and done.get("n_texts") == n and done.get("stamp") == self.stamp
            why = f"it counts {done.get('n_texts')} texts, the verified stats.jsonl {n}"
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            ok, why = False, f"it is damaged ({type(e).__name__})"
        if ok:
            return done
        note(f"{self.done_path} does not match the scores ({why}) — deleting it; scoring resumes at text {n}")
        self.done_path.unlink()
        return None

    # ------------------------------------------------------------------ writing
    def append(self, rows: list[dict]) -> None:
        """Append rows with one write and an fsync, then record the chunk's checksum (a chunk
        is on disk, and verifiable, before the next is scored)."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with open(self.stats_path, "ab") as f:
            start = f.seek(0, os.SEEK_END)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        record = {"end": start + len(data), "lines": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
        with open(self.chunks_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, info: dict) -> None:
        self.done = {**info, "stamp": self.stamp}
        atomic_write(self.done_path, json.dumps(self.done, indent=2, default=str))

    # ------------------------------------------------------------------ reading
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

    def n_saved(self) -> int:
        """Texts in recorded chunks (for a progress message; not verified)."""
        return sum(c["lines"] for c in self._read_chunks())
