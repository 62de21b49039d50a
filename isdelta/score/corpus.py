"""Streaming a text corpus (jsonl or txt) one record at a time, with byte spans for re-reading.

Nothing here holds more than one record: scoring reads the corpus in chunks, and the curriculum
re-reads single records by their byte span (``read_span``) to write them in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isdelta.program import ProgramError

__all__ = [
    "CorpusError",
    "CorpusIndex",
    "Record",
    "chunked",
    "corpus_format",
    "iter_records",
    "read_span",
    "resolve_path",
]


class CorpusError(ProgramError, ValueError):
    """A corpus file that cannot be read as configured; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One text of the corpus.

    Attributes
    ----------
    index : int
        0-based position among the corpus's texts (blank lines are not texts).
    id : str or int
        The row's ``id_field`` value, else ``index``.
    text : str
    prompt : str or None
        The user turn for ``wrap: assistant`` (the row's ``prompt_field``), if any.
    span : (int, int)
        Byte offset and length of the record in the file (for :func:`read_span`).
    """

    index: int
    id: Any
    text: str
    prompt: str | None
    span: tuple[int, int]


def resolve_path(path: str) -> Path:
    """The corpus file: a path, or ``builtin:NAME`` for ``isdelta/data/NAME.jsonl``."""
    if path.startswith("builtin:"):
        from importlib.resources import files

        p = Path(str(files("isdelta") / "data" / f"{path.split(':', 1)[1]}.jsonl"))
    else:
        p = Path(path).expanduser()
    if not p.is_file():
        raise CorpusError(
            f"data.path: {p} does not exist" + (" as a file" if p.exists() else ""),
            fix="give a jsonl or txt file, or builtin:score_demo",
        )
    return p


def corpus_format(path: Path, fmt: str) -> str:
    """The format to read: the configured one, or by the file suffix when it is "auto"."""
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "txt"


def iter_records(data, path: Path | None = None) -> Iterator[Record]:
    """Yield the corpus's records in file order (``data``: the config's data section)."""
    path = path or resolve_path(data.path)
    jsonl = corpus_format(path, data.format) == "jsonl"
    spans = _lines(path) if jsonl or data.txt_unit == "line" else _paragraphs(path)
    i = 0
    for lineno, offset, raw in spans:
        if not raw.strip():
            continue
        try:
            if jsonl:
                rid, text, prompt = _from_json(data, i, raw, path, lineno)
            else:
                rid, text, prompt = i, raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not UTF-8 text", str(e), "save the corpus as UTF-8") from None
        yield Record(i, rid, text, prompt, (offset, len(raw)))
        i += 1
        if data.limit and i >= data.limit:
            return


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, offset, raw
            offset += len(raw)


def _paragraphs(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(first line number, byte offset, bytes) of each block of non-blank lines."""
    block, start, first = b"", 0, 0
    for lineno, offset, raw in _lines(path):
        if raw.strip():
            if not block:
                start, first = offset, lineno
            block += raw
        elif block:
            yield first, start, block.rstrip(b"\r\n")
            block = b""
    if block:
        yield first, start, block.rstrip(b"\r\n")


def _from_json(data, index: int, raw: bytes, path: Path, lineno: int) -> tuple[Any, str, str | None]:
    """(id, text, prompt) of one jsonl row."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from e
    if not isinstance(row, dict) or data.text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise CorpusError(f"{path}:{lineno}: no '{data.text_field}' field (set data.text_field); got {keys}.")
    text = row[data.text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{path}:{lineno}: '{data.text_field}' must be a string; got {type(text).__name__}.")
    rid = row.get(data.id_field, index) if data.id_field else index
    prompt = row.get(data.prompt_field)
    return rid, text, prompt if isinstance(prompt, str) else None


def read_span(f, span: tuple[int, int], fmt: str, text_field: str, rid: Any) -> dict:
    """The record at ``span`` of an open binary file, as the dict a shard line holds.

    jsonl rows come back unchanged (all their fields), so a shard is a drop-in corpus file; a txt
    text becomes ``{"id": ..., text_field: text}``.
    """
    f.seek(span[0])
    raw = f.read(span[1])
    if fmt == "jsonl":
        return json.loads(raw)
    return {"id": rid, text_field: raw.decode("utf-8").rstrip("\r\n")}


@dataclass(frozen=True)
class CorpusIndex:
    """Where each text lies in the corpus file (ids and byte spans per position, no texts).

    Holds two small values per text, so sorting a corpus never holds the corpus; ``rows``
    re-reads the records at given positions, one at a time.
    """

    path: Path
    fmt: str
    text_field: str
    ids: list
    spans: list[tuple[int, int]]

    @classmethod
    def build(cls, data, path: Path) -> CorpusIndex:
        """One streaming pass over the corpus (``data``: the config's data section)."""
        ids, spans = [], []
        for r in iter_records(data, path):
            ids.append(r.id)
            spans.append(r.span)
        return cls(path, corpus_format(path, data.format), data.text_field, ids, spans)

    def rows(self, positions) -> Iterator[dict]:
        """The records at ``positions`` in that order, as shard lines (see :func:`read_span`)."""
        with open(self.path, "rb") as f:
            for p in positions:
                yield read_span(f, self.spans[p], self.fmt, self.text_field, self.ids[p])


def chunked(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    """Lists of at most ``size`` consecutive records."""
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
