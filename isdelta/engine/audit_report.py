"""What a batch audit returns: named findings (what is wrong, where, how much, the fix) and a table.

One :class:`Finding` per kind of problem; :class:`BatchReport` holds them with the checks that ran
and the ones that could not (and why). ``str(report)`` is the table a failing test prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

__all__ = ["LOGP_KINDS", "BatchAuditError", "BatchReport", "Finding", "Kind"]


class Kind:
    """The names of the findings: plain strings, so a test compares them with the text it reads."""

    EOS_DROPPED = "EOS dropped (pad == eos)"
    STOP_NOT_COUNTED = "stop token not counted"
    STOP_COUNTED = "stop token counted (convention excludes it)"
    AFTER_STOP = "tokens counted after the first stop"
    PADS_NO_STOP = "pads counted after a completion without a stop"
    NOT_COUNTED = "real tokens not counted"
    ROW_MASKED = "completion not counted at all"
    RIGHT_PADDED_PROMPT = "right-padded prompt"
    EMPTY_PROMPT = "empty prompt"
    POSITIONS = "positions not cumsum(mask) − 1"
    LOGP_INVALID = "log-probs not finite or > 0"
    LOGP_SHIFTED = "log-probs shifted by one column"
    LOGP_MISMATCH = "log-probs disagree with the model"
    PER_SEQUENCE = "loss normalised per sequence instead of per token"
    WEIGHTS_OTHER = "loss weights neither per token nor per sequence"
    WEIGHTS_ZERO = "loss weights all zero"


# the findings about the per-token log-probs (the other kinds are about masks, prompts, positions, weights)
LOGP_KINDS = (Kind.LOGP_INVALID, Kind.LOGP_SHIFTED, Kind.LOGP_MISMATCH)


@dataclass(frozen=True)
class Finding:
    """One problem of a batch.

    Attributes
    ----------
    kind : str
        One of :class:`Kind`'s names.
    rows : tuple of int
        Affected rows.
    cols : tuple of int
        Affected columns of ``block`` (union over the affected rows).
    detail : str
        The evidence, with an example row, and what the problem does to the numbers.
    fix : str
        What to change.
    nats : float, optional
        Model checks only: the largest error of a sequence log-prob it causes, in nats.
    block : {"completion", "prompt", "input", "row"}
        Which columns ``cols`` indexes: the completion block [N, C], the prompt block [N, P], the
        whole input [N, P + C], or none (a per-row finding).
    """

    kind: str
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    detail: str
    fix: str
    nats: float | None = None
    block: str = "completion"

    def to_dict(self) -> dict:
        return asdict(self)


class BatchAuditError(AssertionError):
    """A batch audit found problems; the message is the report's table (for use in tests)."""


@dataclass(frozen=True)
class BatchReport:
    """The result of :func:`isdelta.engine.audit.audit_batch`.

    Attributes
    ----------
    findings : tuple of Finding
        Empty when the batch follows the conventions (DESIGN.md §2–§3) on every check that ran.
    n_rows : int
    checked : tuple of str
        The checks that ran.
    notes : tuple of str
        Checks that could not run (and what they need), and assumptions the ones that ran made.
    """

    findings: tuple[Finding, ...]
    n_rows: int
    checked: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds found, in report order, each once."""
        return tuple(dict.fromkeys(f.kind for f in self.findings))

    def get(self, kind: str) -> Finding | None:
        """The finding of ``kind``, or None."""
        return next((f for f in self.findings if f.kind == kind), None)

    def raise_if_any(self) -> None:
        """Raise :class:`BatchAuditError` (an ``AssertionError``) with the table if anything was found."""
        if self.findings:
            raise BatchAuditError("\n" + str(self))

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "n_rows": self.n_rows,
            "findings": [f.to_dict() for f in self.findings],
            "checked": list(self.checked),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        n = len(self.findings)
        head = f"batch audit: {self.n_rows} rows, " + (f"{n} finding{'s' * (n != 1)}" if n else "no findings")
        lines = [head, f"checked: {', '.join(self.checked) or 'nothing'}"]
        if self.findings:
            lines += ["", *_table(self.findings), ""]
            for i, f in enumerate(self.findings, 1):
                lines += [f"{i}. {f.kind}", *_wrap("   ", f.detail), *_wrap("   fix: ", f.fix)]
        if self.notes:
            lines += ["", "notes:"] + [line for note in self.notes for line in _wrap("  - ", note)]
        return "\n".join(lines)


def spans(values: Iterable[int], limit: int = 6) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"`` (at most ``limit`` spans, then a count)."""
    vals = sorted(set(int(v) for v in values))
    runs: list[list[int]] = []
    for v in vals:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        text += f", … ({len(vals)} in all)"
    return text or "-"


def _table(findings: tuple[Finding, ...]) -> list[str]:
    """The findings as fixed-width rows: number, kind, rows, columns, nats per sequence."""
    body = [
        (
            str(i),
            f.kind,
            spans(f.rows),
            "-" if f.block == "row" else f"{f.block} {spans(f.cols)}",
            "-" if f.nats is None else f"{f.nats:.3g}",
        )
        for i, f in enumerate(findings, 1)
    ]
    head = ("#", "kind", "rows", "columns", "nats/seq (max)")
    widths = [max(len(r[k]) for r in [head, *body]) for k in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r).rstrip() for r in body
    ]


def _wrap(prefix: str, text: str, width: int = 100) -> list[str]:
    """``text`` wrapped to ``width`` columns, the first line after ``prefix``, the rest indented."""
    import textwrap

    return textwrap.wrap(text, width, initial_indent=prefix, subsequent_indent=" " * len(prefix)) or [prefix]
