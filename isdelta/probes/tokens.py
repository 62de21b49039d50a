"""Token-level diagnostics: where two models' next-token distributions differ.

:func:`compare_tokens` scores both models at the selected completion positions of one rollout
batch (the *carrier*: either model's own samples, or reference responses teacher-forced) in the
engine's batched, chunked pass, and returns a :class:`~isdelta.probes.token_result.TokenComparison`
table: per position and model the entropy, varentropy, chosen-token probability, top-k tokens,
nucleus size and tail mass, and between the models KL both ways and the top-1 / nucleus / tail
deltas, each on the full distribution and on the sampling distribution (after the transform).
Each position is classified lock / fork / diffuse / mixed (:mod:`~isdelta.probes.token_classify`)
from model A's full distribution; locks are ``strict`` (same top-1 under B) or ``swap``, and
flagged ``self_correction`` after a phrase such as "Wait".

:func:`run_tokens` does this for several carriers and writes ``tokens.csv``, ``tokens.json``,
``tokens.md`` and the plots, as the run pipeline calls it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from isdelta.engine.rollouts import Rollouts
from isdelta.engine.transform import LogitTransform
from isdelta.probes.token_classify import TokenThresholds, classify, lock_type
from isdelta.probes.token_positions import (
    DEFAULT_PATTERNS,
    DEFAULT_SELF_CORRECTION,
    compile_patterns,
    contexts,
    parse_positions,
    row_pieces,
    select_positions,
    self_correction,
)
from isdelta.probes.token_result import TokenComparison, add_deltas
from isdelta.probes.token_stats import collect_stats

__all__ = ["TokenOptions", "compare_tokens", "run_tokens"]


@dataclass(frozen=True)
class TokenOptions:
    """Options of :func:`compare_tokens` (defaults in one place, one comment each).

    Attributes
    ----------
    positions : ``"all"``, ``"every:K"``, ``"random:N"`` or ``"pattern"``
        (:mod:`~isdelta.probes.token_positions`).
    top_k : top tokens listed per position and model (5).
    top_p : the nucleus whose size is reported: tokens needed to reach this mass (0.9). A
        statistic only; the sampling transform's own top-p is in ``transform``.
    tail_k : the tail is the mass beyond the top ``tail_k`` tokens (20).
    transform : the sampling transform (temperature → top-k → top-p) of the "trunc" view.
    patterns, window, n_random : ``positions="pattern"``: regexes on the decoded completion,
        ±window tokens around each match, plus n_random random positions.
    self_correction : regexes; a position whose preceding ``self_correction_tokens`` tokens
        match one is flagged ``self_correction`` (a lock there is a self-correction lock).
    context_tokens : decoded tokens of context kept per position for the tables (24).
    thresholds : lock / fork / diffuse thresholds (:class:`TokenThresholds`).
    include_eos : count the first stop token's position (DESIGN.md §3).
    seed : for ``random:N`` and the random part of ``pattern``.
    token_budget, chunk_elems : batching as in :class:`~isdelta.engine.EngineConfig`; peak
        logits memory ≈ chunk_elems · 4 bytes (8 [m, V] buffers of chunk_elems / 8 elements).
    progress : show a progress bar.
    """

    positions: str = "all"
    top_k: int = 5
    top_p: float = 0.9
    tail_k: int = 20
    transform: LogitTransform = field(default_factory=LogitTransform)
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    window: int = 2
    n_random: int = 16
    self_correction: tuple[str, ...] = DEFAULT_SELF_CORRECTION
    self_correction_tokens: int = 6
    context_tokens: int = 24
    thresholds: TokenThresholds = field(default_factory=TokenThresholds)
    include_eos: bool = True
    seed: int = 0
    token_budget: int = 16384
    chunk_elems: int = 2**23
    progress: bool = True

    def __post_init__(self) -> None:
        parse_positions(self.positions)
        for name in ("top_k", "tail_k", "self_correction_tokens", "context_tokens", "token_budget", "chunk_elems"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        for name in ("window", "n_random"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {getattr(self, name)!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}.")
        if not isinstance(self.transform, LogitTransform):
            raise TypeError(f"transform must be a LogitTransform; got {type(self.transform).__name__}.")
        if not isinstance(self.thresholds, TokenThresholds):
            raise TypeError(f"thresholds must be a TokenThresholds; got {type(self.thresholds).__name__}.")
        compile_patterns(self.patterns, "patterns")
        compile_patterns(self.self_correction, "self_correction")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["transform"], d["thresholds"] = self.transform.to_dict(), self.thresholds.to_dict()
        return d


def _options(options: TokenOptions | None, overrides: dict) -> TokenOptions:
    options = options or TokenOptions()
    unknown = sorted(set(overrides) - {f.name for f in fields(TokenOptions)})
    if unknown:
        raise TypeError(f"compare_tokens got unknown option(s) {unknown}; valid: "
                        f"{', '.join(f.name for f in fields(TokenOptions))}.")
    return replace(options, **overrides) if overrides else options


def _decoder(tokenizer):
    """id -> text of one token (special tokens kept: an EOS position shows its token)."""
    return lambda i: tokenizer.decode([int(i)], skip_special_tokens=False)


def compare_tokens(model_a, model_b, rollouts: Rollouts, *, tokenizer=None,
                   options: TokenOptions | None = None, carrier: str = "", **overrides) -> TokenComparison:
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
    pieces = (row_pieces(comp, rollouts.completion_lengths.cpu().numpy(), _decoder(tokenizer))
              if tokenizer is not None else None)
    select = select_positions(counted.numpy(), opts.positions, seed=opts.seed, pieces=pieces,
                              patterns=opts.patterns, window=opts.window, n_random=opts.n_random)
    stats = collect_stats(model_a, model_b, rollouts, torch.from_numpy(select), opts)
    order = np.lexsort((stats["cols"], stats["rows"]))
    stats = {k: v[order] for k, v in stats.items()}
    return _build(stats, rollouts, comp, pieces, tokenizer, opts, carrier)


def _build(stats: dict, rollouts: Rollouts, comp: np.ndarray, pieces, tokenizer, opts: TokenOptions,
           carrier: str) -> TokenComparison:
    """The result table: statistics, classes, decoded contexts and token texts."""
    rows, cols = stats.pop("rows").astype(np.int64), stats.pop("cols").astype(np.int64)
    M, t = len(rows), opts.thresholds
    table = {"carrier": np.full(M, carrier, dtype=object), "row": rows, "step": cols,
             "prompt": rollouts.group.cpu().numpy()[rows], "token_id": comp[rows, cols].astype(np.int64)}
    table.update(stats)
    add_deltas(table)
    table["a_class"] = classify(stats["a_top1_p"], stats["a_top2_p"], stats["a_nucleus"], stats["a_tail"], t)
    table["b_class"] = classify(stats["b_top1_p"], stats["b_top2_p"], stats["b_nucleus"], stats["b_tail"], t)
    table["lock_type"] = np.where(table["a_class"] == "lock",
                                  lock_type(stats["a_topk_id"][:, 0], stats["b_topk_id"][:, 0]), "").astype(object)
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
def run_tokens(model_a, model_b, carriers: Mapping[str, Rollouts], *, tokenizer=None,
               options: TokenOptions | None = None, names: tuple[str, str] = ("A", "B"),
               n_interesting: int = 10, out_dir: str | Path | None = None, plots: bool = True) -> dict:
    """:func:`compare_tokens` on every carrier, the tables and the plots, as the run calls it.

    Writes ``tokens.csv`` (one row per position and carrier), ``tokens.json`` (the returned dict),
    ``tokens.md`` and ``tokens_*.png`` into ``out_dir`` (None: nothing written). Returns a
    JSON-safe dict: ``summary`` (headline figures and per-category aggregates), ``markdown``
    (lines for summary.md), ``plots``, ``timings``.
    """
    from isdelta.probes.token_report import category_table, markdown_lines

    t0, parts = time.perf_counter(), []
    for label, ro in carriers.items():
        parts.append(compare_tokens(model_a, model_b, ro, tokenizer=tokenizer, options=options, carrier=label))
    res = TokenComparison.concat(parts)
    report = {"summary": res.to_dict(), "names": list(names), "timings": {"compare": time.perf_counter() - t0},
              "plots": [], "files": []}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res.to_csv(out / "tokens.csv")
        report["files"].append("tokens.csv")
        if plots:
            from isdelta.probes.token_plots import draw_token_plots

            report["plots"] = draw_token_plots(out, res, names)
    report["markdown"] = markdown_lines(res, names, n_interesting, report["plots"])
    report["category_tables"] = {c: category_table(res, c, names) for c in res.carriers}
    text = json.dumps(report, indent=2, allow_nan=False)
    if out_dir is not None:
        from isdelta.report import atomic_write

        atomic_write(out / "tokens.md", "\n".join(report["markdown"]) + "\n")
        atomic_write(out / "tokens.json", text)
    return json.loads(text)  # the same dict a resumed run reads back (lists, not tuples)
