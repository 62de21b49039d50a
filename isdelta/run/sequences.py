"""sequences.csv: one row per sample of the run, for reading the estimate sample by sample."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from isdelta.outputs import atomic_write

__all__ = ["write_sequences_csv"]


def write_sequences_csv(path: Path, s0: dict, s1: dict, texts: list[str], weights) -> None:
    """One row per sample: ids, length, stop, S0, S1, log-ratio, weights (raw and the ones the
    estimate used), entropy sums, text."""
    log_r = s1["logp"] - s0["logp"]
    w, used = weights.w_raw, weights.w
    group = s0["group"]
    sample_id = np.zeros(len(group), dtype=int)
    for p in np.unique(group):
        sample_id[group == p] = np.arange((group == p).sum())

    def write(f) -> None:
        wr = csv.writer(f)
        wr.writerow(
            [
                "prompt_id",
                "sample_id",
                "length",
                "stopped",
                "S0",
                "S1",
                "log_ratio",
                "weight",
                "weight_smoothed",
                "entropy_sum0",
                "entropy_sum1",
                "text",
            ]
        )
        for i in range(len(group)):
            wr.writerow(
                [
                    int(group[i]),
                    int(sample_id[i]),
                    int(s0["length"][i]),
                    bool(s0["stopped"][i]),
                    f"{s0['logp'][i]:.6f}",
                    f"{s1['logp'][i]:.6f}",
                    f"{log_r[i]:.6g}",
                    f"{w[i]:.6g}",
                    f"{used[i]:.6g}",
                    f"{s0['entropy_sum'][i]:.6f}",
                    f"{s1['entropy_sum'][i]:.6f}",
                    texts[i],
                ]
            )

    atomic_write(path, write, text=True)
