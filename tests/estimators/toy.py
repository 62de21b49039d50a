"""A tabular autoregressive toy small enough to enumerate every sequence (exact references).

Vocabulary {0 = STOP, 1, …, V−1}; at most ``depth`` tokens. At each position the next token is
drawn from softmax(θ[prompt, prefix]); a completion ends at the first STOP (counted, like EOS)
or is cut after ``depth`` tokens without one (like ``max_new_tokens``). Each prompt is a
different table of logits (a different "initial state"). The update p0 → p1 is a step
θ1 = θ0 + α·Δ along a fixed random direction Δ.

Everything a scorer would report is exact here: log p(x), L, stopped, Σ_t H(next | prefix),
the STOP token's log-prob and its share of the entropy sum; and so are the estimands: H(p) by
enumeration, the entropy rate Σ_p E_p[−log p] / Σ_p E_p[L], and their no-EOS variants.
Per-position data too (``enumerate_tokens`` / ``token_rows``): each position's log-prob of the
taken token, the exact next-token entropy H_t, and the completion mask, laid out [.., C] as the
engine reports them (C = ``depth``; positions after the stop are masked).
Sampling draws sequence indices from the enumerated distribution, vectorised over
repetitions, prompts and rows.
Reusable by benchmarks: ``TabularToy(...).sample(rng, alpha, n_reps, G)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["Enumeration", "TabularToy", "TokenEnumeration"]

STOP = 0


@dataclass(frozen=True)
class Enumeration:
    """All M sequences of the toy under one parameter value; prompt-dependent arrays [P, M]."""

    logp: np.ndarray  # [P, M] log p(x)
    entropy_sum: np.ndarray  # [P, M] Σ_t H(next token | prefix_t) over counted positions
    eos_logp: np.ndarray  # [P, M] log p(STOP | prefix) at the final STOP, 0 if not stopped
    eos_entropy_sum: np.ndarray  # [P, M] Σ_t −p(STOP|prefix_t) log p(STOP|prefix_t), all t
    length: np.ndarray  # [M] counted tokens (STOP included)
    stopped: np.ndarray  # [M] bool, ends with STOP

    @property
    def prob(self) -> np.ndarray:
        """p(x), [P, M]; sums to 1 over M for every prompt."""
        return np.exp(self.logp)

    def exact(self) -> dict[str, float]:
        """Estimands with equal prompt mass: h, h_tok and their ``_no_eos`` variants (nats)."""
        p = self.prob
        neg = -self.logp
        neg_no_eos = neg + self.eos_logp  # −(S − log p(STOP)) on stopped rows
        len_no_eos = self.length - self.stopped
        return {
            "h": float((p * neg).sum(1).mean()),
            "h_tok": float((p * neg).sum(1).mean() / (p * self.length).sum(1).mean()),
            "h_no_eos": float((p * neg_no_eos).sum(1).mean()),
            "h_tok_no_eos": float((p * neg_no_eos).sum(1).mean() / (p * len_no_eos).sum(1).mean()),
            "h_chain_rule": float((p * self.entropy_sum).sum(1).mean()),
            "h_no_eos_chain_rule": float((p * (self.entropy_sum - self.eos_entropy_sum)).sum(1).mean()),
        }


@dataclass(frozen=True)
class TokenEnumeration:
    """Per-position quantities of all M sequences under one parameter value, [P, M, C].

    Masked positions (after the stop) hold 0 in ``token_logp`` and ``token_entropy``.
    """

    token_logp: np.ndarray  # [P, M, C] log p(x_t | prefix) of the taken token
    token_entropy: np.ndarray  # [P, M, C] H(next token | prefix_t)
    mask: np.ndarray  # [M, C] bool, counted positions (STOP included)


class TabularToy:
    """p_α(x | prompt) with tabular logits θ0 + α·Δ over all non-STOP prefixes.

    Parameters
    ----------
    n_prompts : int
        P, number of prompts (independent logit tables).
    vocab : int
        V ≥ 2 tokens including STOP.
    depth : int
        Maximum completion length (1 ≤ depth ≤ 4 keeps M = Σ_k (V−1)^k small).
    seed : int
        Seeds θ0 and Δ.
    scale : float
        Standard deviation of θ0 (sharper or flatter next-token distributions).
    stop_bias : float
        Added to the STOP logit everywhere (longer or shorter completions).
    """

    def __init__(
        self,
        n_prompts: int = 4,
        vocab: int = 4,
        depth: int = 4,
        seed: int = 0,
        scale: float = 1.0,
        stop_bias: float = -0.5,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_prompts, self.vocab, self.depth = n_prompts, vocab, depth
        words = range(1, vocab)
        self.prefixes = [p for k in range(depth) for p in itertools.product(words, repeat=k)]
        index = {p: i for i, p in enumerate(self.prefixes)}
        self.theta0 = rng.normal(0.0, scale, size=(n_prompts, len(self.prefixes), vocab))
        self.theta0[..., STOP] += stop_bias
        self.direction = rng.normal(0.0, 1.0, size=self.theta0.shape)
        self.sequences = [(*p, STOP) for p in self.prefixes]
        self.sequences += list(itertools.product(words, repeat=depth))  # cut, no STOP
        m, d = len(self.sequences), depth
        # positions of each sequence: (prefix index, token) pairs, padded with a masked slot
        self._pos_prefix = np.zeros((m, d), dtype=np.int64)
        self._pos_token = np.zeros((m, d), dtype=np.int64)
        self._mask = np.zeros((m, d), dtype=bool)
        for j, seq in enumerate(self.sequences):
            for t, tok in enumerate(seq):
                self._pos_prefix[j, t], self._pos_token[j, t] = index[seq[:t]], tok
                self._mask[j, t] = True
        self.length = self._mask.sum(1).astype(np.float64)
        self.stopped = np.array([seq[-1] == STOP for seq in self.sequences])

    @property
    def n_sequences(self) -> int:
        """M, the number of distinct completions per prompt."""
        return len(self.sequences)

    def enumerate(self, alpha: float) -> Enumeration:
        """Exact per-sequence quantities under θ0 + α·Δ."""
        theta = self.theta0 + alpha * self.direction  # [P, n_prefix, V]
        log_q = theta - np.logaddexp.reduce(theta, axis=-1, keepdims=True)
        ent = -(np.exp(log_q) * log_q).sum(-1)  # [P, n_prefix]
        stop_ent = -np.exp(log_q[..., STOP]) * log_q[..., STOP]  # [P, n_prefix]
        tok_logp = log_q[:, self._pos_prefix, self._pos_token]  # [P, M, depth]
        tok_ent = ent[:, self._pos_prefix]  # [P, M, depth]
        last = self._mask.sum(1) - 1  # [M] index of the final position
        stop = self.stopped[None, :]
        m = np.arange(self.n_sequences)
        return Enumeration(
            logp=np.where(self._mask, tok_logp, 0.0).sum(-1),
            entropy_sum=np.where(self._mask, tok_ent, 0.0).sum(-1),
            eos_logp=np.where(stop, tok_logp[:, m, last], 0.0),
            eos_entropy_sum=np.where(self._mask, stop_ent[:, self._pos_prefix], 0.0).sum(-1),
            length=self.length,
            stopped=self.stopped,
        )

    def enumerate_tokens(self, alpha: float) -> TokenEnumeration:
        """Exact per-position quantities under θ0 + α·Δ (their masked row sums are
        ``enumerate(alpha).logp`` and ``.entropy_sum``)."""
        theta = self.theta0 + alpha * self.direction  # [P, n_prefix, V]
        log_q = theta - np.logaddexp.reduce(theta, axis=-1, keepdims=True)
        ent = -(np.exp(log_q) * log_q).sum(-1)  # [P, n_prefix]
        tok_logp = log_q[:, self._pos_prefix, self._pos_token]  # [P, M, C]
        return TokenEnumeration(
            token_logp=np.where(self._mask, tok_logp, 0.0),
            token_entropy=np.where(self._mask, ent[:, self._pos_prefix], 0.0),
            mask=self._mask,
        )

    def sample(self, rng: np.random.Generator, alpha: float, n_reps: int, g: int) -> np.ndarray:
        """Sequence ids drawn from p_α, int array [n_reps, P, G] (inverse-CDF, vectorised).

        Each prompt's CDF is offset by its prompt index so one ``searchsorted`` over the
        concatenated, still increasing, CDFs serves all prompts at once.
        """
        prob = self.enumerate(alpha).prob  # [P, M]
        cdf = np.cumsum(prob, axis=1)
        cdf[:, -1] = 1.0  # guard the last bin against rounding
        offset = np.arange(self.n_prompts)[:, None]
        flat = (cdf + offset).ravel()  # [P * M], increasing
        u = rng.random((n_reps, self.n_prompts, g))
        idx = np.searchsorted(flat, u + offset[None, :, :], side="right")
        return np.minimum(idx, flat.size - 1) - offset[None] * self.n_sequences

    def rows(
        self, ids: np.ndarray, alpha0: float, alpha1: float, prompts: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """``estimate`` inputs for sampled ids [..., P', G] scored under α0 (sampler) and α1.

        ``prompts`` [P'] says which prompt each slice of axis −2 belongs to (default: all P).
        """
        e0, e1 = self.enumerate(alpha0), self.enumerate(alpha1)
        prompts = np.arange(self.n_prompts) if prompts is None else np.asarray(prompts)
        p = prompts[:, None]  # [P', 1], broadcasts over [..., P', G]

        def take(a: np.ndarray) -> np.ndarray:
            return a[p, ids] if a.ndim == 2 else a[ids]

        return {
            "log_p0": take(e0.logp),
            "log_p1": take(e1.logp),
            "length": take(e0.length),
            "stopped": take(e0.stopped),
            "entropy_sum0": take(e0.entropy_sum),
            "entropy_sum1": take(e1.entropy_sum),
            "eos_logp0": take(e0.eos_logp),
            "eos_logp1": take(e1.eos_logp),
            "eos_entropy_sum0": take(e0.eos_entropy_sum),
            "eos_entropy_sum1": take(e1.eos_entropy_sum),
        }

    def token_rows(
        self, ids: np.ndarray, alpha0: float, alpha1: float, prompts: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """``estimate_tokens`` inputs for sampled ids [..., P', G]: arrays [..., P', G, C].

        Keys ``token_logp0``, ``token_logp1``, ``token_entropy0``, ``token_entropy1``, ``mask``.
        """
        e0, e1 = self.enumerate_tokens(alpha0), self.enumerate_tokens(alpha1)
        prompts = np.arange(self.n_prompts) if prompts is None else np.asarray(prompts)
        p = prompts[:, None]  # [P', 1], broadcasts over [..., P', G]
        return {
            "token_logp0": e0.token_logp[p, ids],
            "token_logp1": e1.token_logp[p, ids],
            "token_entropy0": e0.token_entropy[p, ids],
            "token_entropy1": e1.token_entropy[p, ids],
            "mask": self._mask[ids],
        }
