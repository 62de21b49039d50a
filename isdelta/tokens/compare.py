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

:func:`run_tokens` does this for several carriers, adds the strata (completion length,
correctness), intervals over carrier rows on every aggregate, the probing table and the
token-text aggregates, and writes ``tokens.csv``, ``tokens_by_text.csv``, ``tokens.json``,
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
from isdelta.tokens.significance import ALL_CARRIERS, CarrierBootstrap, probing_rows, strata_summary
from isdelta.tokens.stats import collect_stats
from isdelta.tokens.strata import add_strata
from isdelta.tokens.table import TokenComparison, add_deltas
from isdelta.tokens.token_texts import token_text_summary, write_token_texts

__all__ = ["compare_tokens", "run_tokens", "summarise"]


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
    # the token whose hidden state scores position c: completion c − 1, or the last prompt token
    # (the prompt block is left-padded, so its last column is real) at c = 0
    last_prompt = rollouts.prompt_ids[:, -1].cpu().numpy()  # [N]
    table = {
        "carrier": np.full(M, carrier, dtype=object),
        "row": rows,
        "step": cols,
        "prompt": rollouts.group.cpu().numpy()[rows],
        "token_id": comp[rows, cols].astype(np.int64),
        "prev_token_id": np.where(cols > 0, comp[rows, np.maximum(cols - 1, 0)], last_prompt[rows]).astype(np.int64),
        "length": rollouts.completion_lengths.cpu().numpy()[rows].astype(np.int64),
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
        ids = np.unique(
            np.concatenate(
                [table["token_id"], table["prev_token_id"], stats["a_topk_id"].ravel(), stats["b_topk_id"].ravel()]
            )
        )
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
    rewards: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """:func:`compare_tokens` on every carrier, the tables and the plots, as the run calls it.

    ``rewards`` maps a carrier label to one reward per rollout row (NaN where the prompt has no
    answer; a carrier left out is "unknown"): the correctness strata. Every aggregate gets a
    bootstrap interval over carrier rows (:mod:`~isdelta.tokens.significance`).

    Writes ``tokens.csv`` (one row per position and carrier), ``tokens_by_text.csv`` (mean
    entropy per current / next token), ``tokens.json`` (the returned dict), ``tokens.md`` and
    ``tokens_*.png`` into ``out_dir`` (None: nothing written). Returns a JSON-safe dict:
    ``summary`` (headline figures, per-category and per-stratum aggregates with intervals, the
    probing table, the token-text lists), ``markdown`` (lines for summary.md), ``plots``,
    ``timings``.
    """
    from isdelta.tokens.report import category_table, markdown_lines

    opts = options or TokenOptions()
    t0, parts = time.perf_counter(), []
    for label, ro in carriers.items():
        parts.append(compare_tokens(model_a, model_b, ro, tokenizer=tokenizer, options=opts, carrier=label))
    res = TokenComparison.concat(parts)
    res = TokenComparison(add_strata(res.table, rewards, opts.length_bins), res.vocab, res.options)
    t1 = time.perf_counter()
    summary = summarise(res, opts)
    report = {
        "summary": summary,
        "names": list(names),
        "timings": {"compare": t1 - t0, "bootstrap": time.perf_counter() - t1},
        "plots": [],
        "files": [],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res.to_csv(out / "tokens.csv")
        write_token_texts(out / "tokens_by_text.csv", res)
        report["files"] += ["tokens.csv", "tokens_by_text.csv"]
        if plots:
            from isdelta.tokens.plots import draw_token_plots

            report["plots"] = draw_token_plots(out, res, names)
    report["markdown"] = markdown_lines(res, names, n_interesting, report["plots"], summary)
    report["category_tables"] = {
        c: category_table(res, c, names, summary["carriers"][c]["categories"]) for c in res.carriers
    }
    text = json.dumps(report, indent=2, allow_nan=False)
    if out_dir is not None:
        atomic_write(out / "tokens.md", "\n".join(report["markdown"]) + "\n")
        atomic_write(out / "tokens.json", text)
    return json.loads(text)  # the same dict a resumed run reads back (lists, not tuples)


def summarise(res: TokenComparison, opts: TokenOptions) -> dict:
    """:meth:`TokenComparison.to_dict` with intervals on every aggregate, the strata, the probing
    table (per carrier, all carriers pooled, and per stratum) and the token-text lists."""
    boot = CarrierBootstrap.of(res, opts.n_boot, opts.ci_level, opts.seed, opts.bootstrap_unit)
    pooled = CarrierBootstrap.of(res, opts.n_boot, opts.ci_level, opts.seed, "prompt", pooled=True)
    summary = res.to_dict()
    groups, by_stratum = {}, {}
    for c in [*res.carriers, None]:
        on = np.ones(len(res), dtype=bool) if c is None else res["carrier"] == c
        b = pooled if c is None else boot
        cats, strata = b.categories(res, on), strata_summary(res, b, c)
        label = ALL_CARRIERS if c is None else c
        if c is None:
            summary["all_carriers"] = {"categories": cats, "strata": strata}
        else:
            d = summary["carriers"][c]
            d["headline"].update(boot.intervals(on))
            d["categories"], d["strata"] = cats, strata
        groups[label] = cats
        for dim, rows in strata.items():
            for r in rows:
                by_stratum[f"{label} / {dim}: {r['stratum']}"] = r["categories"]
    summary["probing"] = probing_rows(groups)
    summary["probing_strata"] = probing_rows(by_stratum)
    summary["token_texts"] = token_text_summary(res, opts.token_min_count, opts.n_token_texts)
    summary["bootstrap"] = {
        "n_boot": opts.n_boot,
        "level": opts.ci_level,
        "unit": opts.bootstrap_unit,
        "seed": opts.seed,
        "n_units": int(boot.counts.shape[1]),
        "n_prompts": int(pooled.counts.shape[1]),
        "interval": "percentile; units resampled within each carrier; all carriers pooled: prompts resampled",
    }
    return summary
