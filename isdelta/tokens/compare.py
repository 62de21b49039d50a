"""Token-level comparison of two models: where their next-token distributions differ.

:func:`compare_tokens` scores both models at the selected completion positions of one rollout
batch (the *carrier*: either model's own samples, or reference responses teacher-forced) in the
engine's batched, chunked pass, and returns a :class:`~isdelta.tokens.table.TokenComparison`
table: per position and model the entropy, varentropy, chosen-token probability, top-k tokens,
nucleus size and tail mass, and between the models KL both ways and the top-1 / nucleus / tail
deltas, each on the full distribution and on the sampling distribution (after the transform).
Each position is classified lock / fork / diffuse / mixed (:mod:`~isdelta.tokens.classes`)
from model A's full distribution; locks are ``strict`` (same top-1 under B) or ``swap``, and
flagged ``self_correction`` after a phrase such as "Wait".

:func:`run_tokens` does this for several carriers and writes ``tokens.csv``, ``tokens.json``,
``tokens.md`` and the plots, as the run pipeline calls it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from isdelta.engine.rollouts import Rollouts
from isdelta.outputs import atomic_write
from isdelta.tokens.classes import classify, lock_type
from isdelta.tokens.options import TokenOptions
from isdelta.tokens.positions import contexts, row_pieces, select_positions, self_correction
from isdelta.tokens.stats import collect_stats
from isdelta.tokens.table import TokenComparison, add_deltas

__all__ = ["compare_tokens", "run_tokens"]


def _options(options: TokenOptions | None, overrides: dict) -> TokenOptions:
    options = options or TokenOptions()
    unknown = sorted(set(overrides) - {f.name for f in fields(TokenOptions)})
    if unknown:
        raise TypeError(
            f"compare_tokens got unknown option(s) {unknown}; valid: {', '.join(f.name for f in fields(TokenOptions))}."
        )
    return replace(options, **overrides) if overrides else options


def _decoder(tokenizer):
    """id -> text of one token (special tokens kept: an EOS position shows its token)."""
    return lambda i: tokenizer.decode([int(i)], skip_special_tokens=False)


def compare_tokens(
    model_a,
    model_b,
    rollouts: Rollouts,
    *,
    tokenizer=None,
    options: TokenOptions | None = None,
    carrier: str = "",
    **overrides,
) -> TokenComparison:
    """Compare two models' next-token distributions at selected positions of ``rollouts``.

    Parameters
    ----------
    model_a, model_b : HF causal LMs with one vocabulary (A: before, B: after the update).
    rollouts : Rollouts
        The carrier: completions scored under both (teacher forcing): samples of either model,
        or reference responses (the positions are the counted completion tokens; the prompt is
        never scored).
    tokenizer : HF tokenizer, optional
        Decodes tokens and contexts for the tables; needed by ``positions="pattern"`` and the
        self-correction flag. Without it tokens show as ``<id>``.
    options : TokenOptions, optional
    carrier : str
        A label stored in every row (e.g. ``"p0 samples"``).
    **overrides
        Any :class:`TokenOptions` field, e.g. ``positions="every:4", top_k=10``.

    Returns
    -------
    TokenComparison
        One row per selected position, sorted by (row, step).
    """
    opts = _options(options, overrides)
    counted = rollouts.mask(opts.include_eos).cpu()  # [N, C]
    comp = rollouts.completion_ids.cpu().numpy()  # [N, C]
    pieces = (
        row_pieces(comp, rollouts.completion_lengths.cpu().numpy(), _decoder(tokenizer))
        if tokenizer is not None
        else None
    )
    select = select_positions(
        counted.numpy(),
        opts.positions,
        seed=opts.seed,
        pieces=pieces,
        patterns=opts.patterns,
        window=opts.window,
        n_random=opts.n_random,
    )
    stats = collect_stats(model_a, model_b, rollouts, torch.from_numpy(select), opts)
    order = np.lexsort((stats["cols"], stats["rows"]))
    stats = {k: v[order] for k, v in stats.items()}
    return _build(stats, rollouts, comp, pieces, tokenizer, opts, carrier)


def _build(
    stats: dict, rollouts: Rollouts, comp: np.ndarray, pieces, tokenizer, opts: TokenOptions, carrier: str
) -> TokenComparison:
    """The result table: statistics, classes, decoded contexts and token texts."""
    rows, cols = stats.pop("rows").astype(np.int64), stats.pop("cols").astype(np.int64)
    M, t = len(rows), opts.thresholds
    table = {
        "carrier": np.full(M, carrier, dtype=object),
        "row": rows,
        "step": cols,
        "prompt": rollouts.group.cpu().numpy()[rows],
        "token_id": comp[rows, cols].astype(np.int64),
    }
    table.update(stats)
    add_deltas(table)
    table["a_class"] = classify(stats["a_top1_p"], stats["a_top2_p"], stats["a_nucleus"], stats["a_tail"], t)
    table["b_class"] = classify(stats["b_top1_p"], stats["b_top2_p"], stats["b_nucleus"], stats["b_tail"], t)
    table["lock_type"] = np.where(
        table["a_class"] == "lock", lock_type(stats["a_topk_id"][:, 0], stats["b_topk_id"][:, 0]), ""
    ).astype(object)
    if pieces is not None:
        table["context"] = contexts(pieces, rows, cols, opts.context_tokens)
        near = contexts(pieces, rows, cols, opts.self_correction_tokens)
        table["self_correction"] = self_correction(near, opts.self_correction)
        ids = np.unique(np.concatenate([table["token_id"], stats["a_topk_id"].ravel(), stats["b_topk_id"].ravel()]))
        vocab = {int(i): _decoder(tokenizer)(i) for i in ids}
    else:
        table["context"] = np.full(M, "", dtype=object)
        table["self_correction"] = np.zeros(M, dtype=bool)
        vocab = {}
    return TokenComparison(table, vocab, opts.to_dict())


# ---------------------------------------------------------------------------- the run stage
def run_tokens(
    model_a,
    model_b,
    carriers: Mapping[str, Rollouts],
    *,
    tokenizer=None,
    options: TokenOptions | None = None,
    names: tuple[str, str] = ("A", "B"),
    n_interesting: int = 10,
    out_dir: str | Path | None = None,
    plots: bool = True,
) -> dict:
    """:func:`compare_tokens` on every carrier, the tables and the plots, as the run calls it.

    Writes ``tokens.csv`` (one row per position and carrier), ``tokens.json`` (the returned dict),
    ``tokens.md`` and ``tokens_*.png`` into ``out_dir`` (None: nothing written). Returns a
    JSON-safe dict: ``summary`` (headline figures and per-category aggregates), ``markdown``
    (lines for summary.md), ``plots``, ``timings``.
    """
    from isdelta.tokens.report import category_table, markdown_lines

    t0, parts = time.perf_counter(), []
    for label, ro in carriers.items():
        parts.append(compare_tokens(model_a, model_b, ro, tokenizer=tokenizer, options=options, carrier=label))
    res = TokenComparison.concat(parts)
    report = {
        "summary": res.to_dict(),
        "names": list(names),
        "timings": {"compare": time.perf_counter() - t0},
        "plots": [],
        "files": [],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res.to_csv(out / "tokens.csv")
        report["files"].append("tokens.csv")
        if plots:
            from isdelta.tokens.plots import draw_token_plots

            report["plots"] = draw_token_plots(out, res, names)
    report["markdown"] = markdown_lines(res, names, n_interesting, report["plots"])
    report["category_tables"] = {c: category_table(res, c, names) for c in res.carriers}
    text = json.dumps(report, indent=2, allow_nan=False)
    if out_dir is not None:
        atomic_write(out / "tokens.md", "\n".join(report["markdown"]) + "\n")
        atomic_write(out / "tokens.json", text)
    return json.loads(text)  # the same dict a resumed run reads back (lists, not tuples)
