"""``python -m isdelta.score cfg.yaml [--set k=v ...] [--out DIR]``: characterise a text corpus.

Every text is scored teacher-forced under each configured model (entropy, varentropy and NLL
per text: :data:`isdelta.score.stats.STATS`), streamed in chunks of ``engine.chunk_texts``
texts and appended to ``OUT/models/NAME/stats.jsonl`` as each chunk finishes; a rerun resumes
after the last complete chunk. Then, from the saved statistics:

- ``OUT/curriculum/``: the corpus sorted by a statistic (or a linear combination), cut into k
  bins (``bin-XX.jsonl`` shards), with ``manifest.json``, ``schedule.json`` and ``order.csv``;
- ``OUT/compare/`` (two models or more): Spearman and Kendall rank correlations, a distance
  matrix and a PCA of the models' per-text vectors, and ``side_by_side.csv``;
- ``OUT/predictor/`` (``predictor:`` set): logistic regressions of an outcome per text (a corpus
  label, or whether the model's own answer is right: :mod:`isdelta.score.outcome`) on entropy
  and varentropy, and their correlation matrices (:mod:`isdelta.score.predictor`);
- ``OUT/plots/``, ``OUT/summary.json`` and ``OUT/summary.md`` (with throughput).

How a text is fed to the engine (the engine scores completion tokens given a prompt) is
described in :mod:`isdelta.score.scorer`: a one-token prefix (or a chat template) is the prompt,
the text the completion, and a sentinel id that occurs in no text is the only stop id.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from isdelta import program
from isdelta.outputs import atomic_write, file_sha256, versions
from isdelta.program import ConfigError, ExitCode, ProgramError, folder_lock, stage
from isdelta.program.folder import MANIFEST, make_folder
from isdelta.score.config import load_score_config
from isdelta.score.corpus import CorpusError
from isdelta.score.models import model_store, placed, score_models
from isdelta.score.report import summary_markdown
from isdelta.score.store import StoreError

__all__ = ["PROGRAM", "check_corpus", "main", "progress", "score", "score_models"]


# ---------------------------------------------------------------------------- derived outputs
def build_curriculum(cfg, out: Path, corpus: Path) -> dict | None:
    """Sort by the configured key, cut into bins and write ``OUT/curriculum/``."""
    from isdelta.score.config import parse_key
    from isdelta.score.corpus import CorpusIndex
    from isdelta.score.curriculum import build_curriculum as _build
    from isdelta.score.curriculum import combine_key, write_curriculum

    c = cfg.curriculum
    if c is None:
        return None
    terms = parse_key(c.key, c.model or cfg.names[0])
    cols = [(_key_column(cfg, out, stat, model), w) for stat, model, w in terms]
    key = combine_key(cols, c.standardize)
    index = CorpusIndex.build(cfg.data, corpus)
    if len(index.ids) != len(key):  # the stamps and checksums make this a damaged folder
        raise StoreError(
            f"{out / 'models'}: the saved statistics hold {len(key)} texts, the corpus {len(index.ids)}",
            "the folder was changed by hand",
            f"delete {out / 'models'} to rescore",
            code=ExitCode.OUTPUT_FOLDER,
        )
    cur = _build(key, c.bins, c.binning, c.schedule, c.cycles)
    label = " + ".join(("" if w == 1 else f"{w:g}·") + f"{s}@{m}" for s, m, w in terms)
    meta = {
        "key": label,
        "terms": [{"stat": s, "model": m, "weight": w} for s, m, w in terms],
        "standardize": c.standardize,
        "binning": c.binning,
    }
    write_curriculum(out / "curriculum", cur, key, index, meta)
    if cfg.output.plots:
        from isdelta.score.plots import plot_curriculum

        plot_curriculum(out / "plots" / "curriculum.png", key, cur.edges, cur.counts, label)
    return {**meta, **cur.to_dict(), "extremes": _extremes(cur, key, index)}


def _key_column(cfg, out: Path, stat: str, model: str) -> np.ndarray:
    """A curriculum key term: the model's per-text statistic, or its square root (``sqrt_STAT``)."""
    base = stat.removeprefix("sqrt_")
    x = model_store(cfg, out, cfg.names.index(model)).columns([base])[1][base]
    return np.sqrt(np.clip(x, 0.0, None)) if stat != base else x


def build_predictor(cfg, out: Path, corpus: Path, corpus_hash: str) -> dict | None:
    """Entropy as a predictor of the outcome (:func:`isdelta.score.outcome.build_predictor`)."""
    from isdelta.score.outcome import build_predictor as _build

    def columns(name: str, stats: list[str]) -> dict[str, np.ndarray]:
        return model_store(cfg, out, cfg.names.index(name)).columns(stats)[1]

    return None if cfg.predictor is None else _build(cfg, out, corpus, corpus_hash, columns)


def _extremes(cur, key: np.ndarray, index, n: int = 3) -> dict:
    """The n lowest- and highest-key texts (short excerpts), to show what the key measures."""
    out = {}
    for side, pos in (("lowest", cur.order[:n]), ("highest", cur.order[::-1][:n])):
        out[side] = [
            {"id": index.ids[p], "key": float(key[p]), "excerpt": row[index.text_field][:80]}
            for p, row in zip(pos, index.rows(pos))
        ]
    return out


def build_comparison(cfg, out: Path, infos: dict[str, dict]) -> dict | None:
    """Rank correlations, distances, PCA and the side-by-side table (two models or more)."""
    from isdelta.score.compare import compare_models
    from isdelta.score.stats import KEY_STATS

    if cfg.compare is None or len(cfg.models) < 2:
        return None
    names, stat = list(cfg.names), cfg.compare.stat
    stores = [model_store(cfg, out, i) for i in range(len(names))]
    X = np.vstack([s.columns([stat])[1][stat] for s in stores])  # [M, n]
    ok = np.isfinite(X).all(0)
    if ok.sum() < 3:  # e.g. a corpus of empty texts: no ranks to correlate
        return {"skipped": f"only {int(ok.sum())} texts have a finite {stat} under every model; ranks need ≥ 3"}
    res = compare_models(X[:, ok], names, stat, cfg.compare.distance)
    (out / "compare").mkdir(exist_ok=True)
    _side_by_side(out / "compare" / "side_by_side.csv", stores, names, KEY_STATS)
    d = res.to_dict()
    d["same_tokenizer"] = len({infos[n].get("tokenizer") for n in names}) == 1
    if not d["same_tokenizer"]:
        d["note"] = (
            "the models use different tokenizers: per-token statistics average over different "
            "tokens; compare nll_sum or bits_per_char across them"
        )
    (out / "compare" / "comparison.json").write_text(json.dumps(d, indent=2))
    if cfg.output.plots:
        from isdelta.score import plots

        p = out / "plots"
        plots.plot_rank_scatter(p / "rank_scatter.png", X[:, ok], names, res.spearman, stat)
        plots.plot_distance(p / "distance.png", res.distance, names, res.metric, stat)
        plots.plot_pca(p / "pca.png", res.pca.coords, res.pca.explained_variance_ratio, names, stat)
    return d


def _side_by_side(path: Path, stores, names: list[str], stats: tuple[str, ...]) -> None:
    """One row per text, ``stat@model`` columns; the stats files are read in step (streamed)."""
    import csv
    from contextlib import ExitStack

    with ExitStack() as stack, open(path, "w", newline="") as f:
        files = [stack.enter_context(open(s.stats_path, encoding="utf-8")) for s in stores]
        w = csv.writer(f)
        w.writerow(["index", "id"] + [f"{s}@{n}" for s in stats for n in names])
        for lines in zip(*files):
            rows = [json.loads(x) for x in lines]
            w.writerow([rows[0]["index"], rows[0]["id"]] + [r[s] for s in stats for r in rows])


# ---------------------------------------------------------------------------- summary
def model_table(cfg, out: Path, infos: dict[str, dict]) -> dict[str, dict]:
    """Corpus-level figures and throughput per model (and the sorted-curve plot)."""
    from isdelta.score.stats import KEY_STATS, aggregate

    table, curves = {}, {}
    for i, name in enumerate(cfg.names):
        _, cols = model_store(cfg, out, i).columns(list(KEY_STATS) + ["n_chars"])
        n_chars = cols.pop("n_chars")
        table[name] = {
            "path": cfg.models[i].path,
            "temperature": cfg.models[i].temperature,
            **aggregate(cols, n_chars),
            "n_unscored": int((cols["n_tokens"] == 0).sum()),
            "n_not_finite": _n_not_finite(cols),
            "throughput": infos[name]["throughput"],
        }
        curves[name] = cols[cfg.compare.stat if cfg.compare else "entropy_mean"]
    if cfg.output.plots:
        from isdelta.score.plots import plot_sorted

        stat = cfg.compare.stat if cfg.compare else "entropy_mean"
        plot_sorted(out / "plots" / f"sorted_{stat}.png", curves, stat)
    return table


def _n_not_finite(cols: dict[str, np.ndarray]) -> int:
    """Scored texts with a NaN/inf statistic (bits_per_char aside: NaN when a text is not scored whole).

    Scoring refuses them (:func:`isdelta.score.models.check_finite`); a folder written before it
    did can still hold some."""
    scored = cols["n_tokens"] > 0
    stats = [v for k, v in cols.items() if k not in ("n_tokens", "bits_per_char")]
    return int((scored & ~np.isfinite(np.vstack(stats)).all(0)).sum())


def _check_summary(summary: dict, out: Path) -> None:
    """ProgramError (exit 2) after the summary is written when a model's saved statistics are not finite."""
    for name, r in summary["models"].items():
        if r.get("n_not_finite"):
            raise ProgramError(
                f"{out / 'models' / name / 'stats.jsonl'}: {r['n_not_finite']} of {r['n_texts']} scored texts hold "
                "NaN/inf statistics (saved by an isdelta that did not check them); summary.md shows them as n/a",
                "the scores cannot be compared or binned",
                f"delete {out / 'models' / name} to rescore that model",
            )


MAX_EMPTY_SHARDS = 1000  # curriculum bins or ramps beyond the corpus's texts that are still written


def check_corpus(cfg, corpus: Path) -> int:
    """Read the whole corpus once before any model loads (every record readable); its text count."""
    from isdelta.score.corpus import iter_records

    n = sum(1 for _ in iter_records(cfg.data, corpus))
    if n == 0:
        raise CorpusError(f"data.path: {corpus} holds no texts", fix="give a jsonl or txt file with texts")
    if cfg.compare is not None and len(cfg.models) > 1 and n < 3:
        raise ConfigError(
            f"compare: rank correlations need ≥ 3 texts, the corpus has {n}",
            fix="score a larger corpus, or set compare: null",
        )
    c = cfg.curriculum
    for key, value in (("bins", c and c.bins), ("cycles", c and c.cycles)):
        # one shard file per bin (and ramp): a few empty ones are harmless (a small corpus with the
        # default 4 bins), 1e30 of them cannot even be listed
        if value and value > max(n, MAX_EMPTY_SHARDS):
            raise ConfigError(
                f"curriculum.{key}: {value} is more than the corpus's {n} texts",
                f"a {'bin' if key == 'bins' else 'saw-tooth ramp'} holds whole texts and is a file of its own, so "
                f"all but {n} of {value} files would be empty",
                f"set curriculum.{key} to at most {n}",
            )
    if cfg.predictor is not None:
        from isdelta.score.outcome import check_outcome_source

        check_outcome_source(cfg, corpus)
    return n


def score(cfg, out: Path | None = None) -> dict:
    """Score, build the curriculum and the comparison, write the summary; return it as a dict.

    The corpus, the devices and the folder are checked before any model loads; the output
    folder is locked while the run writes it.
    """
    from isdelta.program.ranks import ranks
    from isdelta.score.corpus import resolve_path

    key = "--out" if out else "output.dir"
    out = Path(out or cfg.output.dir)
    corpus = resolve_path(cfg.data.path)
    r = ranks()

    def check() -> int:
        n = check_corpus(cfg, corpus)
        for i, m in enumerate(cfg.models):
            placed(m, f"models.{i}").check_device(f"models.{i}")
        return n

    n = r.agree(check)
    with ExitStack() as stack:

        def hold() -> None:  # rank 0 holds the folder; the others write only their shares in it
            make_folder(out, key)
            stack.enter_context(folder_lock(out, key))
            if (out / MANIFEST).exists():
                raise ConfigError(
                    f"{key} {out}: the folder holds an isdelta.run run", fix="pass another --out for the score program"
                )

        r.agree(lambda: hold() if r.root else None)
        return _score(cfg, out, corpus, file_sha256(corpus)[:16], n if r.world > 1 else None)


def _score(cfg, out: Path, corpus: Path, corpus_hash: str, n_texts: int | None = None) -> dict:
    from isdelta.program.ranks import ranks

    r = ranks()
    timings: dict[str, float] = {}
    r.agree(lambda: _prepare(cfg, out) if r.root else None)
    infos = score_models(cfg, out, timings, corpus_hash, n_texts)
    return r.agree(lambda: _derived(cfg, out, corpus, corpus_hash, infos, timings) if r.root else {})


def _prepare(cfg, out: Path) -> None:
    """The plots folder, the derived-settings note, config.yaml (rank 0)."""
    import yaml

    from isdelta.score.store import stamp_of

    (out / "plots").mkdir(parents=True, exist_ok=True)
    _note_derived_change(cfg, out, stamp_of)
    atomic_write(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _derived(cfg, out: Path, corpus: Path, corpus_hash: str, infos: dict, timings: dict) -> dict:
    """Curriculum, comparison, predictor, plots and the summary, from the saved scores."""
    _clear_derived(cfg, out)
    with stage("curriculum, comparison, plots", timings):
        summary = {
            "name": out.name,
            "corpus": str(corpus),
            "corpus_sha256": corpus_hash,
            "models": model_table(cfg, out, infos),
            "curriculum": build_curriculum(cfg, out, corpus),
            "comparison": build_comparison(cfg, out, infos),
            "predictor": build_predictor(cfg, out, corpus, corpus_hash),
            "timings": timings,
            "versions": versions(),
        }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str))
    atomic_write(out / "summary.md", summary_markdown(summary))
    print(summary_markdown(summary))
    print(f"outputs: {out}/ (summary.md, models/*/stats.jsonl, curriculum/, compare/, predictor/, plots/)")
    _check_summary(summary, out)
    return summary


def _clear_derived(cfg, out: Path) -> None:
    """Remove our plots and comparison (rebuilt next), and a curriculum no longer configured."""
    for png in (out / "plots").glob("*.png"):
        png.unlink()
    shutil.rmtree(out / "compare", ignore_errors=True)
    shutil.rmtree(out / "predictor", ignore_errors=True)  # the saved answers (outcome/) are kept
    if cfg.curriculum is None:
        shutil.rmtree(out / "curriculum", ignore_errors=True)


def _note_derived_change(cfg, out: Path, stamp_of) -> None:
    """Say so when curriculum/compare settings changed: those outputs are rebuilt from the scores."""
    derived = stamp_of(cfg.model_dump(mode="json", include={"curriculum", "compare", "predictor"}))
    path = out / "derived_stamp"
    if path.exists() and path.read_text().strip() != derived:
        print(
            f"[isdelta] {out}: curriculum/compare/predictor settings changed since the last run; rebuilding "
            "curriculum/, compare/ and predictor/ from the saved scores (scores are reused).",
            file=sys.stderr,
        )
    path.write_text(derived + "\n")


def progress(cfg, out: Path) -> list[str]:
    """Texts scored and saved per model, for the Ctrl-C message."""
    lines = []
    for i, name in enumerate(cfg.names):
        n = model_store(cfg, out, i).n_saved()
        if n:
            lines.append(f"{n} texts scored under {name} (models/{name}/stats.jsonl)")
    return lines


PROGRAM = program.Program(
    prog="python -m isdelta.score",
    description="Characterise a text corpus by entropy and varentropy.",
    set_example="models.0.temperature=0.7",
    load=load_score_config,
    execute=score,
    progress=progress,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m isdelta.score cfg.yaml [--set k=v ...] [--out DIR]``; returns the exit code."""
    return program.main(PROGRAM, argv)
