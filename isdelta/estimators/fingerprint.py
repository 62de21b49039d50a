"""What identifies the rows an estimate was computed on, so that :func:`headline` never combines
results of different rows (another sample set, another order or grouping)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from isdelta.estimators.groups import Groups

__all__ = ["S0_TOL", "RowsFingerprint"]

# Two scorings of the same rows agree on S0 = log p0 up to summation order (the engine sums float32
# token log-probs in float64: ~1e-13) or, scored twice in bf16, ~1e-2 nats per token; two sample
# sets differ by nats per row. The tolerance per counted token that separates the two:
S0_TOL = 1e-2


@dataclass(frozen=True)
class RowsFingerprint:
    """What identifies the rows a result was computed on, so that :func:`headline` never combines
    results of different rows. Everything here is equal for ``estimate`` and ``estimate_tokens``
    called on the same rows, in the caller's row order:

    - ``n_rows``, N;
    - ``layout``: a digest of the partition of rows into prompts, each row labelled by the first
      row of its prompt (so a 2-D [P, G] layout and 1-D rows with any ``group`` ids agree);
    - ``length``: counted tokens per row *with* the stop token, [N] int (``estimate``'s ``length``
      before ``include="no_eos"`` subtracts it; the mask's row sums for ``estimate_tokens``);
    - ``log_p0``: S0_i = log p0 of the whole row, [N] float64 (``log_p0``; Σ_t m_it token_logp0),
      equal up to summation order: compared within ``S0_TOL`` nats per counted token.

    Computed once per call (O(N)); a result built by hand carries None and is not compared.
    """

    n_rows: int
    n_prompts: int
    layout: str
    length: np.ndarray = field(repr=False)
    log_p0: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, groups: Groups, length: np.ndarray, log_p0: np.ndarray) -> RowsFingerprint:
        """From the prompt groups and the caller-order [N] lengths (stop token included) and S0."""
        digest = _layout_digest(groups)
        return cls(groups.n_rows, groups.n_prompts, digest, np.asarray(length, dtype=np.int64), log_p0.copy())

    def to_dict(self) -> dict:
        """N, P and the layout digest (the per-row arrays stay out of reports)."""
        return {"n_rows": self.n_rows, "n_prompts": self.n_prompts, "layout": self.layout}

    def differs(self, other: RowsFingerprint) -> str | None:
        """How ``other`` describes different rows (None: the same rows)."""
        if self.n_rows != other.n_rows:
            return f"{self.n_rows} rows against {other.n_rows}"
        if self.layout != other.layout:
            return (
                f"{self.n_rows} rows grouped into other prompts ({self.n_prompts} against {other.n_prompts} "
                "prompts, or the rows come in another order)"
            )
        if not np.array_equal(self.length, other.length):
            i = int(np.flatnonzero(self.length != other.length)[0])
            return (
                f"other lengths (row {i}: {int(self.length[i])} against {int(other.length[i])} counted tokens, "
                "stop token included; `length` must be the row sums of estimate_tokens' `mask`)"
            )
        tol = S0_TOL * np.maximum(self.length, 1)
        off = ~(np.abs(self.log_p0 - other.log_p0) <= tol)  # written so that a nan S0 differs
        if off.any():
            i = int(np.flatnonzero(off)[0])
            return (
                f"other sequences: log p0 of row {i} is {self.log_p0[i]:.6g} against {other.log_p0[i]:.6g} "
                f"({int(off.sum())} of {self.n_rows} rows differ by more than {S0_TOL:g} nats per token)"
            )
        return None


def _layout_digest(groups: Groups) -> str:
    """A digest of the partition of the rows (in the caller's order) into prompts.

    Rows that come prompt after prompt (the engine's layout, whatever the ids) are their run
    lengths, P numbers: hashing those rather than the [N] labels (blake2b of 8 MB: 13 ms at
    N = 10^6, most of a bare SNIS) gives the same answer to "same partition?". Other layouts
    hash each row's label, the caller index of its prompt's first row. The two never collide:
    a partition is contiguous exactly when its labels never decrease, and the inputs differ in
    length (8N against 4 + 8P bytes).
    """
    if groups.order is None:
        runs = groups.sizes
    else:
        first = groups.order[groups.starts]  # [P] caller index of each prompt's first row
        label = groups.unsort(np.repeat(first, groups.sizes)).astype(np.int64)  # [N] caller order
        if not np.all(label[1:] >= label[:-1]):
            return hashlib.blake2b(label, digest_size=16).hexdigest()
        runs = np.diff(np.flatnonzero(np.diff(label, prepend=-1, append=label.shape[0] + 1)))
    return hashlib.blake2b(b"runs" + runs.astype(np.int64).tobytes(), digest_size=16).hexdigest()
