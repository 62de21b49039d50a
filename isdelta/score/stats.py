"""Per-text statistics from the engine's token arrays (numpy only; never imports torch).

Each text is one engine row whose counted positions are the text's n scored tokens followed by
one *sentinel* position (see :mod:`isdelta.score.scorer`)::

    counted position   0    1   ...  n-1   | n
    predicts           t1   t2  ...  tn    | (sentinel: nothing real)
    used for           entropy_*, varentropy_*, nll_*  | entropy_next, varentropy_next

so the sentinel's distribution is the model's next-token distribution after the whole text.
All values in nats unless the name ends in ``_bits`` / ``bits_per_char``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["KEY_STATS", "STATS", "aggregate", "text_stats"]

LN2 = math.log(2.0)

# name -> meaning (one place: the docs, the config check and the writer all use it)
STATS: dict[str, str] = {
    "n_tokens": "scored tokens of the text (the prefix, or an unscored first token, excluded)",
    "entropy_mean": "mean over the text's positions of H(next token | prefix)",
    "entropy_sum": "sum of the same (the expected NLL of the text under the model's own sampling)",
    "varentropy_mean": "mean of Var[-log p] of the next-token distributions",
    "nll_mean": "mean -log p(token) over the text's tokens (nats)",
    "nll_mean_bits": "the same in bits",
    "nll_sum": "-log p(text | prefix) (nats)",
    "bits_per_char": "nll_sum / ln 2 / characters (null when the text is truncated or prefix=none)",
    "entropy_last": "H of the distribution that predicts the text's last token",
    "varentropy_last": "its varentropy",
    "entropy_next": "H of the next-token distribution after the whole text (is it 'finished'?)",
    "varentropy_next": "its varentropy",
}
# statistics a curriculum can sort by or a comparison can compare
KEY_STATS = tuple(STATS)


def text_stats(arrays: dict[str, np.ndarray], n_text: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row statistics of rows laid out as text tokens + one sentinel position.

    Parameters
    ----------
    arrays : dict
        ``SequenceScores.to_numpy()``: ``token_logp``, ``token_entropy``, ``token_varentropy``
        float32 [N, C] and ``length`` int [N], counted positions packed at the left.
    n_text : int array [N]
        Scored text tokens per row (>= 1); ``length == n_text + 1`` (the sentinel).

    Returns
    -------
    dict of float64 [N]
        Every name of :data:`STATS` except ``bits_per_char`` (it needs character counts).

    Naive equivalent, per row: ``H = token_entropy[i, :n]``, ``entropy_mean = H.mean()``, …,
    ``entropy_next = token_entropy[i, n]``.
    """
    n_text = np.asarray(n_text, dtype=np.int64)
    if not (np.asarray(arrays["length"]) == n_text + 1).all():
        raise ValueError(
            "each row must count its text tokens plus exactly one sentinel position; "
            f"lengths {arrays['length'][:8]} vs text tokens {n_text[:8]} (+1)"
        )
    H = arrays["token_entropy"].astype(np.float64)  # [N, C]
    VH = arrays["token_varentropy"].astype(np.float64)  # [N, C]
    lp = arrays["token_logp"].astype(np.float64)  # [N, C]
    text = np.arange(H.shape[1])[None, :] < n_text[:, None]  # [N, C]: text positions only
    rows = np.arange(H.shape[0])
    n = n_text.astype(np.float64)
    h_sum = np.where(text, H, 0.0).sum(1)
    nll_sum = -np.where(text, lp, 0.0).sum(1)
    return {
        "n_tokens": n_text,
        "entropy_mean": h_sum / n,
        "entropy_sum": h_sum,
        "varentropy_mean": np.where(text, VH, 0.0).sum(1) / n,
        "nll_mean": nll_sum / n,
        "nll_mean_bits": nll_sum / n / LN2,
        "nll_sum": nll_sum,
        "entropy_last": H[rows, n_text - 1],
        "varentropy_last": VH[rows, n_text - 1],
        "entropy_next": H[rows, n_text],
        "varentropy_next": VH[rows, n_text],
    }


def aggregate(cols: dict[str, np.ndarray], n_chars: np.ndarray) -> dict[str, float]:
    """Corpus-level figures of one model from its per-text columns (scored texts only).

    Token-weighted rates (``entropy_per_token = Σ entropy_sum / Σ n_tokens``) are ratios of sums,
    not means of per-text means, so long texts weigh by their length; ``entropy_mean_of_texts``
    is the plain per-text average beside it.
    """
    L = cols["n_tokens"].astype(np.float64)
    ok = L > 0
    tokens = L[ok].sum()
    if not ok.any():
        return {"n_texts": 0, "n_tokens": 0}
    chars_ok = ok & np.isfinite(cols["bits_per_char"])
    bpc = (cols["nll_sum"][chars_ok].sum() / LN2 / n_chars[chars_ok].sum()) if chars_ok.any() else float("nan")
    return {
        "n_texts": int(ok.sum()),
        "n_tokens": int(tokens),
        "entropy_per_token": float(cols["entropy_sum"][ok].sum() / tokens),
        "entropy_mean_of_texts": float(cols["entropy_mean"][ok].mean()),
        "varentropy_per_token": float((cols["varentropy_mean"][ok] * L[ok]).sum() / tokens),
        "nll_per_token": float(cols["nll_sum"][ok].sum() / tokens),
        "nll_per_token_bits": float(cols["nll_sum"][ok].sum() / tokens / LN2),
        "bits_per_char": float(bpc),
        "entropy_next_mean": float(cols["entropy_next"][ok].mean()),
    }
