"""Teacher-forced scoring of whole texts with the log-prob engine (torch).

The engine scores *completion* tokens given a *prompt*. A text becomes one row::

    prompt (context, not scored)   | completion (counted)
    <prefix>                       | t1 t2 ... tn  S        wrap: none
    <chat template up to content>  | t1 t2 ... tn  S        wrap: user / assistant

- ``<prefix>`` is one token (BOS, EOS, a named token). With ``prefix: none`` the text's own first
  token is the context, so it is not scored (``n_tokens`` counts scored tokens only).
- ``S`` is a *sentinel*: an id that occurs in none of the chunk's texts, passed to the engine as
  the only stop id. Stop-token truncation (DESIGN.md §3) therefore never cuts a text short (a
  text may contain the tokenizer's real EOS), and the sentinel's position (counted, since the
  engine counts the stop token) is the next-token distribution after the whole text, which gives
  ``entropy_next``. Its own log p is meaningless and is left out of every NLL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from isdelta.program import ConfigError
from isdelta.score.corpus import Record
from isdelta.score.stats import LN2, STATS, text_stats

__all__ = ["Encoded", "Encoder", "absent_id", "head_size", "score_chunk", "score_records"]

_SENTINEL_TEXT = "ISDELTA_TEXT_SENTINEL_5f1c"  # marks where the content goes in a rendered template


@dataclass(frozen=True)
class Encoded:
    """Token ids of one text: the unscored context and the scored text tokens."""

    context: list[int]
    text: list[int]
    truncated: bool


def head_size(model) -> int:
    """Rows of the LM head (may exceed len(tokenizer): padded vocabularies)."""
    return int(model.get_output_embeddings().weight.shape[0])


def max_positions(model) -> int | None:
    """The model's context size (:func:`isdelta.engine.context_size`)."""
    from isdelta.engine.models import context_size

    return context_size(model)


class Encoder:
    """Tokenizes records into (context, text) ids for one tokenizer and data section.

    Parameters
    ----------
    tok : HF tokenizer
    data : the config's ``data`` section (wrap, prefix, max_tokens)
    max_positions : int, optional
        The model's context size; a text is truncated so context + text + sentinel fits.
    """

    def __init__(self, tok, data, max_positions: int | None = None) -> None:
        self.tok, self.data, self.max_positions = tok, data, max_positions
        self._templates: dict[str | None, list[int]] = {}
        self.prefix_id = self._prefix_id() if data.wrap == "none" else None

    def _prefix_id(self) -> int | None:
        d, tok = self.data, self.tok
        if d.prefix == "none":
            return None
        if d.prefix == "token":
            tid = tok.convert_tokens_to_ids(d.prefix_token)
            if tid is None or (tid == tok.unk_token_id and d.prefix_token != tok.unk_token):
                raise ConfigError(
                    f"data.prefix_token {d.prefix_token!r} is not a token of this tokenizer; "
                    "give a token string from its vocabulary (e.g. its bos or eos token)."
                )
            return int(tid)
        tid = tok.bos_token_id if d.prefix == "bos" else tok.eos_token_id
        if tid is None:
            raise ConfigError(
                f"data.prefix: {d.prefix} but the tokenizer has no {d.prefix} token; "
                "set data.prefix to another choice (eos, token, none)."
            )
        return int(tid)

    def _template_context(self, prompt: str | None) -> list[int]:
        """Ids of the chat template up to where the text goes (cached per user turn)."""
        d = self.data
        key = prompt if d.wrap == "assistant" else None
        if key not in self._templates:
            if not getattr(self.tok, "chat_template", None):
                raise ConfigError(
                    f"data.wrap: {d.wrap} needs a tokenizer with a chat template; this one "
                    "has none. Use data.wrap: none."
                )
            msgs = [{"role": "user", "content": _SENTINEL_TEXT}]
            if d.wrap == "assistant":
                msgs = [
                    {"role": "user", "content": prompt if prompt is not None else d.user_message},
                    {"role": "assistant", "content": _SENTINEL_TEXT},
                ]
            rendered = self.tok.apply_chat_template(msgs, tokenize=False)
            if rendered.count(_SENTINEL_TEXT) != 1:
                raise ConfigError(
                    "data.wrap: the chat template does not place the message content verbatim; use data.wrap: none."
                )
            # the template's own special tokens appear as text, so no extra ones are added here
            self._templates[key] = self.tok(rendered.split(_SENTINEL_TEXT)[0], add_special_tokens=False)["input_ids"]
        return self._templates[key]

    def __call__(self, records: Sequence[Record]) -> list[Encoded]:
        ids = self.tok([r.text for r in records], add_special_tokens=False)["input_ids"]
        out = []
        for r, t in zip(records, ids):
            t = list(t)
            if self.data.wrap != "none":
                ctx = self._template_context(r.prompt)
            elif self.prefix_id is not None:
                ctx = [self.prefix_id]
            else:  # the first token is the context: it cannot be scored
                ctx, t = t[:1], t[1:]
            cap = self.data.max_tokens or len(t)
            if self.max_positions:
                cap = min(cap, self.max_positions - len(ctx) - 1)  # - 1: the sentinel
            out.append(Encoded(ctx, t[:cap], len(t) > cap))
        return out


def score_chunk(model, engine, encoder: Encoder, records: Sequence[Record]) -> list[dict]:
    """One stats row per record, in order (a text with no scored token gets nulls).

    ``bits_per_char`` is set only where every character of the text was scored (not truncated,
    and a prefix or template before it), since it divides by the text's full length.
    """
    encoded = encoder(records)
    keep = [i for i, e in enumerate(encoded) if e.text]
    stats = score_records(model, engine, [encoded[i] for i in keep]) if keep else {}
    whole = encoder.data.wrap != "none" or encoder.prefix_id is not None
    rows = []
    for r, e in zip(records, encoded):
        rows.append(
            {
                "index": r.index,
                "id": r.id,
                "n_tokens": 0,
                "n_chars": len(r.text),
                "truncated": e.truncated,
                **{k: None for k in STATS if k != "n_tokens"},
            }
        )
    for j, i in enumerate(keep):
        row = rows[i]
        row.update({k: float(v[j]) for k, v in stats.items() if k != "n_tokens"}, n_tokens=len(encoded[i].text))
        if whole and not row["truncated"] and row["n_chars"]:
            row["bits_per_char"] = row["nll_sum"] / LN2 / row["n_chars"]
    return rows


def absent_id(texts: Sequence[Sequence[int]], vocab_size: int) -> int:
    """The largest id below ``vocab_size`` that occurs in none of ``texts`` (the sentinel)."""
    present = set()
    for t in texts:
        present.update(t)
    for cand in range(vocab_size - 1, -1, -1):
        if cand not in present:
            return cand
    raise ValueError(
        f"the chunk uses every one of the {vocab_size} token ids, so no id is free for the "
        "sentinel; lower engine.chunk_texts."
    )


def score_records(model, engine, encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
    """Per-text statistics of encoded texts (each with >= 1 text token) under ``model``.

    Parameters
    ----------
    model : HF causal LM
    engine : LogProbEngine
        Its transform (temperature) defines the scored distribution; ``include_eos`` must be True
        (the sentinel position is the stop token).
    encoded : list of Encoded

    Returns
    -------
    dict of float64 arrays [N]
        :func:`isdelta.score.stats.text_stats` of the rows, in input order.
    """
    from isdelta.engine import Rollouts

    if not engine.config.include_eos:
        raise ValueError("score_records needs EngineConfig(include_eos=True): the sentinel is counted.")
    if any(not e.text for e in encoded):
        raise ValueError("every encoded text needs >= 1 scored token; filter empty texts first.")
    V = head_size(model)
    sentinel = absent_id([e.text for e in encoded], V)
    ro = Rollouts.from_token_lists(
        [e.context for e in encoded],
        [e.text + [sentinel] for e in encoded],
        group=list(range(len(encoded))),
        eos_token_ids=sentinel,
        pad_token_id=sentinel,
        vocab_size=V,
    )
    n_text = np.array([len(e.text) for e in encoded])
    assert (ro.lengths.numpy() == n_text + 1).all(), "the sentinel must be the only stop token"
    return text_stats(engine.score(model, ro).to_numpy(), n_text)
