"""The batched, masked log-prob engine (DESIGN.md §4).

Which logits score which tokens (prompt_len = 3, one row, `_` left pad)::

    column        0   1   2 | 3   4   5
    input         _   p   p | c0  c1  E
    hidden used           h2  h3  h4          (the last token is a target only, never an input)
    scores                c0  c1  E

The model body runs once per micro-batch; the LM head runs only on the hidden states of counted
completion positions, in row chunks of at most ``chunk_elems / V`` tokens, each chunk upcast to
fp32 and reduced to log p(token), entropy and varentropy in the same pass. [N, T, V] fp32 logits
never exist. That reduction is either the eager one (``chunks.token_stats``: the reference, the
only one with a graph and with top-k / top-p) or one compiled pass over the vocabulary
(``fused.py``), chosen once per score call by ``EngineConfig.fused``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from tqdm.auto import tqdm

from isdelta.engine.chunks import token_stats
from isdelta.engine.fused import available, chunk_stats, worth_fusing
from isdelta.engine.masking import position_ids as _position_ids
from isdelta.engine.recompute import checkpointed_layers, head_stats
from isdelta.engine.rollouts import Rollouts, _rows
from isdelta.engine.scores import SequenceScores
from isdelta.engine.split import SplitLM
from isdelta.engine.transform import LogitTransform

__all__ = ["EngineConfig", "LogProbEngine", "SequenceScores", "SplitLM", "check_fp32_weights"]


@dataclass(frozen=True)
class EngineConfig:
    """Options of the log-prob engine.

    Attributes
    ----------
    temperature, top_k, top_p : the sampling transform (see :class:`LogitTransform`); both models
        are always scored with the same one.
    include_eos : count the first stop token (DESIGN.md §3).
    token_budget : most tokens (rows × trimmed width) in one body forward. Rows are sorted
        longest first so an out-of-memory error happens on the first micro-batch.
    chunk_elems : most logits elements per LM-head chunk (2**23 fp32 = 32 MiB; 170 tokens at
        V = 49152).
    requires_grad : keep the autograd graph (the update's loss, the gradient probe); off:
        ``torch.no_grad``.
    recompute : with ``requires_grad``, keep only each decoder layer's input and each LM-head
        chunk's hidden states for the backward, which recomputes the rest one layer or one chunk
        at a time (``recompute.py``): memory bounded by ``chunk_elems`` and one layer, never by
        counted tokens × V, for one more forward in the backward. Off: keep everything.
    check_head : once per model, compare body + head against ``model(...).logits`` on one row, so
        an architecture that transforms logits in a way the engine does not know fails loudly.
    progress : show a progress bar over rows (auto-hidden when not on a terminal).
    fp32 : score in float32 with the model's own float32 weights: any active autocast is turned
        off for the forward, and a model whose floating parameters are not float32 is refused.
        Use it when training keeps fp32 master weights but computes in bf16 (autocast, or a
        bf16 copy for scoring): rounding weights to bf16 turns a small step into a much larger
        random one (AdamW lr 1e-6 on SmolLM2: KL 0.007 in fp32, 0.41–0.45 through bf16
        weights; ``benchmarks/README.md``, bf16). Off: the model scores as it is, under
        whatever autocast the caller has active.
    fused : the chunk statistics in one compiled pass over the vocabulary (``fused.py``).
        "auto": for a score call of at least ``fused.FUSE_MIN_LOGITS`` logits (2**30 on CPU,
        where the 3–11 s compile pays within the call); "on": always; "off": never. Top-k/top-p,
        ``requires_grad`` and a failed compile stay eager. The paths agree to ~1e-5 relative, not
        bit for bit, so p0 and p1 must take one: "auto" depends only on the call's size (the same
        for both), never on whether a kernel is compiled yet. Callers that score many batches
        decide once and pass "on"/"off": ``EntropyMonitor`` at its first scored batch, for all
        its steps (``fused.MONITOR_STEPS``); the run records each score file's path and scores
        p1 on p0's, also after a resume.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    include_eos: bool = True
    token_budget: int = 16384
    chunk_elems: int = 2**23
    requires_grad: bool = False
    recompute: bool = True
    check_head: bool = True
    progress: bool = True
    fp32: bool = False
    fused: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        LogitTransform(self.temperature, self.top_k, self.top_p)  # validates them
        if self.fused not in ("auto", "on", "off"):
            raise ValueError(f"fused must be 'auto', 'on' or 'off'; got {self.fused!r}.")
        if self.token_budget < 1 or self.chunk_elems < 1:
            raise ValueError(f"token_budget and chunk_elems must be >= 1; got {self.token_budget}, {self.chunk_elems}.")

    @property
    def transform(self) -> LogitTransform:
        return LogitTransform(self.temperature, self.top_k, self.top_p)

    @classmethod
    def from_transform(cls, transform: LogitTransform, **kw) -> EngineConfig:
        return cls(temperature=transform.temperature, top_k=transform.top_k, top_p=transform.top_p, **kw)


def check_fp32_weights(model: torch.nn.Module) -> None:
    """EngineConfig(fp32=True) scores float32 weights; refuse a model that has others."""
    low = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()} - {"float32"}
    )
    if low:
        raise ValueError(
            f"EngineConfig(fp32=True) scores the model's float32 weights, but its parameters are {', '.join(low)}: "
            "the update was already rounded to that precision. Score the fp32 master weights (a model kept in "
            "float32 and trained under autocast), or set fp32=False to score this model as it is."
        )


@dataclass
class _Chunk:
    """Flat results of one micro-batch: counted positions (rows, cols) and their values."""

    rows: torch.Tensor
    cols: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    varentropy: torch.Tensor
    stop_term: torch.Tensor


class LogProbEngine:
    """Scores rollouts under a model: per-token log p, entropy and varentropy of counted tokens.

    Naive equivalent (one row, no padding): ``logp = log_softmax(transform(model(ids).logits
    [:, prompt_len-1:-1].float()))``, gathered at the completion ids; entropy ``-(p·logp).sum``.
    Tests compare the two to 1e-5 (fp32).

    Parameters
    ----------
    config : EngineConfig, optional
    """

    _head_checked: ClassVar[weakref.WeakSet] = weakref.WeakSet()  # models whose head was checked

    def __init__(self, config: EngineConfig | None = None, **overrides) -> None:
        config = config or EngineConfig()
        self.config = replace(config, **overrides) if overrides else config

    # ------------------------------------------------------------------ public
    def score(self, model: torch.nn.Module, rollouts: Rollouts) -> SequenceScores:
        """Score every counted token of ``rollouts`` under ``model``.

        Parameters
        ----------
        model : HF causal LM (any dtype, any device)
        rollouts : Rollouts

        Returns
        -------
        SequenceScores
            On the model's device; float32 token arrays, float64 row sums.
        """
        cfg = self.config
        lm = SplitLM.of(model)
        rollouts.check_vocab(lm.vocab_size)
        mask = rollouts.mask(cfg.include_eos)  # [N, C]
        if cfg.fp32:
            check_fp32_weights(lm.model)
        was_training = lm.model.training
        lm.model.eval()  # dropout off: scores must be a function of the parameters
        try:
            with (
                torch.enable_grad() if cfg.requires_grad else torch.no_grad(),
                torch.autocast(lm.device.type, enabled=False) if cfg.fp32 else contextlib.nullcontext(),
                checkpointed_layers(lm.model, cfg.requires_grad and cfg.recompute),
            ):
                if cfg.check_head:
                    self.check_head(lm, rollouts, mask)
                fused = self.fuses(int(mask.sum()) * lm.vocab_size, lm.device)
                chunks = [self._score_batch(lm, rollouts, mask, rows, fused) for rows in self._progress(rollouts, mask)]
        finally:
            lm.model.train(was_training)
        return self._assemble(chunks, rollouts, mask, lm.device)

    def fuses(self, n_logits: int, device: torch.device, calls: int = 1) -> bool:
        """Whether a score call of ``n_logits`` logits (counted tokens × V) takes the compiled
        statistics; ``calls``: decide "auto" as for that many calls of that size (a caller that
        pins the answer for all of them, ``fused.worth_fusing``). Asked after a call, it names the
        path that call took (False once ``torch.compile`` failed on the device)."""
        cfg = self.config
        if cfg.fused == "off" or cfg.requires_grad or cfg.transform.truncates or not available(device):
            return False
        return cfg.fused == "on" or worth_fusing(n_logits, device, calls)

    # ------------------------------------------------------------------ batching
    def micro_batches(self, rollouts: Rollouts, mask: torch.Tensor) -> list[torch.Tensor]:
        """Row-index batches, longest first, each within ``token_budget`` tokens.

        A row needs its real prompt and all but its last counted token as input (the last one is
        only a target), so its width is ``prompt_length + L − 1``; a micro-batch costs
        ``n_rows × (max prompt length + max L − 1)``. Rows with L = 0 need no forward.
        """
        pl = rollouts.prompt_lengths.cpu()
        L = mask.sum(-1).cpu()
        order = torch.argsort(pl + L, descending=True, stable=True)
        order = order[L[order] > 0].tolist()
        batches, cur, max_pl, max_L = [], [], 0, 0
        for r in order:
            npl, nL = max(max_pl, int(pl[r])), max(max_L, int(L[r]))
            if cur and (len(cur) + 1) * (npl + nL - 1) > self.config.token_budget:
                batches.append(torch.tensor(cur))
                cur, npl, nL = [], int(pl[r]), int(L[r])
            cur.append(r)
            max_pl, max_L = npl, nL
        if cur:
            batches.append(torch.tensor(cur))
        return batches

    def _progress(self, rollouts: Rollouts, mask: torch.Tensor):
        batches = self.micro_batches(rollouts, mask)
        bar = tqdm(
            total=rollouts.n_rows,
            desc="scoring",
            unit="row",
            leave=False,
            disable=True if not self.config.progress else None,
        )
        for rows in batches:
            yield rows
            bar.update(len(rows))
        bar.close()

    # ------------------------------------------------------------------ one micro-batch
    def hidden_states(self, lm: SplitLM, rollouts: Rollouts, mask: torch.Tensor, rows: torch.Tensor):
        """Hidden states at the positions that score the counted tokens of some rows.

        One body forward over ``rows`` (a micro-batch of :meth:`micro_batches`), trimmed to the
        widest real prompt and counted completion; hidden state of column c scores token c + 1.

        Parameters
        ----------
        lm : SplitLM
        rollouts : Rollouts
        mask : BoolTensor [N, C]  the counted positions (``rollouts.mask(...)`` or a subset that
            is a prefix of each row: the body never runs past a row's last counted position).
        rows : LongTensor [n]  row indices.

        Returns
        -------
        (hidden [M, D], rows [M], cols [M]) on the model's device: one entry per counted position
        of ``rows``, row-major.
        """
        body, device = lm.body, lm.device
        pl = rollouts.prompt_lengths[rows]
        L = mask[rows].sum(-1)
        max_pl, max_L = int(pl.max()), int(L.max())
        lo, hi = rollouts.prompt_len - max_pl, rollouts.prompt_len + max_L - 1
        ids = rollouts.input_ids[rows, lo:hi].to(device)  # [n, W]
        att = rollouts.attention_mask[rows, lo:hi].to(device)  # [n, W]
        out = body(input_ids=ids, attention_mask=att, position_ids=_position_ids(att), use_cache=False)
        hs = out[0] if isinstance(out, tuple) else out.last_hidden_state  # [n, W, D]
        hs = hs[:, max_pl - 1 : max_pl - 1 + max_L]  # [n, max_L, D]: column c scores token c + 1
        m = mask[rows, :max_L].to(device)  # [n, max_L]
        r_loc, cols = m.nonzero(as_tuple=True)  # [M]
        return hs[r_loc, cols], rows.to(device)[r_loc], cols

    def _score_batch(self, lm: SplitLM, rollouts, mask, rows, fused: bool = False) -> _Chunk:
        device = lm.device
        h, r_idx, cols = self.hidden_states(lm, rollouts, mask, rows)  # [M, D], [M], [M]
        comp = rollouts.completion_ids
        targets = comp[r_idx.to(comp.device), cols.to(comp.device)].to(device)  # [M]
        step = max(1, self.config.chunk_elems // lm.vocab_size)
        M = h.shape[0]
        eos = torch.tensor(rollouts.eos_token_ids, dtype=torch.long, device=device)
        temperature = torch.tensor([self.config.temperature], dtype=torch.float32, device=device)
        # Without a graph the results go into one preallocated buffer: small per-chunk tensors
        # kept alive between large freed ones fragment the CPU heap (RSS grew ~60 MiB a chunk).
        if self.config.requires_grad and self.config.recompute:  # one chunk's memory, backward too (never fused)
            stats_of = lambda z, *c: token_stats(lm.final(z).float(), *c, self.config.transform)
            return _Chunk(r_idx, cols, *head_stats(lm.head, h, step, stats_of, targets, r_idx, eos))
        out = None if self.config.requires_grad else torch.empty(4, M, dtype=torch.float32, device=device)
        parts = []
        for s in range(0, M, step):
            chunk = (targets[s : s + step], r_idx[s : s + step], eos)
            if fused:  # the head's own dtype: the kernel upcasts as it reads
                stats = self._fused_stats(lm.final(lm.head(h[s : s + step])), *chunk, temperature)
            else:  # no local name for the [m, V] logits: token_stats frees them after log_softmax
                stats = token_stats(lm.logits(h[s : s + step]), *chunk, self.config.transform)
            if out is None:
                parts.append(stats)
            else:
                for k in range(4):
                    out[k, s : s + step] = stats[k]
            del stats
        if out is None:
            out = [torch.cat(x) for x in zip(*parts)] if parts else [h.new_zeros(0).float()] * 4
        return _Chunk(r_idx, cols, *out)

    def _fused_stats(self, logits, targets, rows, eos, temperature):
        """``token_stats`` by one compiled pass (``fused.chunk_stats``); the eager path where that
        is unavailable, and for a chunk whose statistics are not finite (it names the rows)."""
        stats = chunk_stats(logits, targets, eos, temperature)
        # finite logits give finite H and Var (S0 >= 1); NaN/inf anywhere in a row reaches both
        if stats is None or not bool(torch.isfinite(stats[1] + stats[2]).all()):
            return token_stats(logits.float(), targets, rows, eos, self.config.transform)
        return stats

    # ------------------------------------------------------------------ assembly
    def _assemble(self, chunks, rollouts, mask, device) -> SequenceScores:
        N, C = mask.shape
        mask = mask.to(device)
        fields = []
        for name in ("logp", "entropy", "varentropy", "stop_term"):
            full = torch.zeros(N, C, dtype=torch.float32, device=device)
            if chunks:
                idx = (torch.cat([c.rows for c in chunks]), torch.cat([c.cols for c in chunks]))
                full = full.index_put(idx, torch.cat([getattr(c, name) for c in chunks]))
            fields.append(full)
        token_logp, token_entropy, token_varentropy, stop_term = fields
        inf_rows = torch.isneginf(token_logp).any(-1)
        if inf_rows.any():
            warnings.warn(
                f"rows {_rows(inf_rows)} hold tokens outside this transform's top-k/top-p set "
                f"({self.config.transform}): log p = -inf. Score with the transform the rows were "
                "sampled with.",
                stacklevel=3,
            )
        return SequenceScores(
            token_logp=token_logp,
            token_entropy=token_entropy,
            token_varentropy=token_varentropy,
            mask=mask,
            logp=token_logp.double().sum(-1),
            length=mask.sum(-1),
            entropy_sum=token_entropy.double().sum(-1),
            group=rollouts.group.to(device),
            stopped=rollouts.stopped.to(device),
            stop_entropy_sum=stop_term.double().sum(-1),
        )

    # ------------------------------------------------------------------ safety check
    def check_head(self, lm: SplitLM, rollouts: Rollouts, mask: torch.Tensor) -> None:
        """Compare ``lm.logits`` of the body's hidden states with ``model(...).logits`` on one short
        row of ``rollouts`` (once per model: later calls return at once); raise TypeError when
        they differ (an architecture that transforms its logits in a way the engine does not know).
        """
        model, body, device = lm.model, lm.body, lm.device
        if model in self._head_checked:
            return
        L = mask.sum(-1)
        if not (L > 0).any():
            return
        r = int((L > 0).nonzero()[0])
        lo = rollouts.prompt_len - int(rollouts.prompt_lengths[r])
        hi = rollouts.prompt_len + min(int(L[r]), 4)
        ids = rollouts.input_ids[r : r + 1, lo:hi].to(device)
        att = torch.ones_like(ids)
        pos = _position_ids(att)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
            hs = body(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False)
            hs = hs[0] if isinstance(hs, tuple) else hs.last_hidden_state
            ours = lm.logits(hs)
        ref, ours = ref[0, -4:].float(), ours[0, -4:]
        if not torch.isfinite(ref).all():
            raise FloatingPointError(
                f"non-finite logits for row {r}: the model produced NaN/inf (overflow in half "
                "precision, or broken weights). Try dtype float32 or bfloat16 instead of float16."
            )
        tol = 1e-4 if lm.head.weight.dtype == torch.float32 else 3e-2
        err = (ref - ours).abs().max().item()
        if not math.isfinite(err) or err > tol * max(1.0, ref.abs().max().item()):
            raise TypeError(
                f"{type(model).__name__}: body + LM head differs from model(...).logits by {err:.3g}; "
                "the architecture transforms its logits in a way the engine does not know. "
                "Please report it with the model name."
            )
        self._head_checked.add(model)
