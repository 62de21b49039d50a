"""The options of the token-level comparison, declared once (the run config's ``tokens:``
section is built from this dataclass, see :func:`isdelta.program.options_section`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from isdelta.engine.transform import LogitTransform
from isdelta.tokens.classes import TokenThresholds
from isdelta.tokens.positions import DEFAULT_PATTERNS, DEFAULT_SELF_CORRECTION, compile_patterns, parse_positions

__all__ = ["RewardName", "TokenOptions"]

# the names of isdelta.training.REWARDS (training sits above tokens, so they are spelled out here;
# a test checks that the two agree)
RewardName = Literal["answer_match", "boxed_match"]


# upper limits of the integer options, each with why more cannot work
_LIMITS = (
    ("top_k", 1000, "it is how many tokens the tables list per position and model"),
    ("length_bins", 1000, "each bin is a stratum with its own intervals, and past that most bins would hold no row"),
    (
        "n_boot",
        100_000,
        "the intervals' Monte Carlo error is ~0.1% of their width at 10^5 resamples, and every "
        "resample holds a weight per carrier row",
    ),
)


@dataclass(frozen=True)
class TokenOptions:
    """Options of :func:`~isdelta.tokens.compare_tokens` (defaults in one place, one comment each).

    Attributes
    ----------
    positions : ``"all"``, ``"every:K"``, ``"random:N"`` or ``"pattern"``
        (:mod:`~isdelta.tokens.positions`).
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
    length_bins : strata by completion length: this many quantile bins of the carriers' lengths (3).
    reward : the rule reward that marks a carrier row correct (``isdelta.training.REWARDS``);
        None: the run's ``update.reward``. Rows whose prompt has no answer are "unknown".
    n_boot : bootstrap resamples of carrier rows behind every interval (1000).
    ci_level : coverage of the intervals (0.95).
    bootstrap_unit : what is resampled: carrier ``"row"`` (one sequence; positions of one
        sequence are not independent) or ``"prompt"`` (all of a prompt's rows together, when the
        G samples of a prompt are themselves correlated).
    token_min_count : a token is listed among the most / least uncertain only when met this often (3).
    n_token_texts : tokens per list in the by-token-text tables (10).
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
    length_bins: int = 3
    reward: RewardName | None = None
    n_boot: int = 1000
    ci_level: float = 0.95
    bootstrap_unit: Literal["row", "prompt"] = "row"
    token_min_count: int = 3
    n_token_texts: int = 10

    def __post_init__(self) -> None:
        parse_positions(self.positions)
        for name in (
            "top_k",
            "tail_k",
            "self_correction_tokens",
            "context_tokens",
            "token_budget",
            "chunk_elems",
            "length_bins",
            "n_boot",
            "token_min_count",
            "n_token_texts",
        ):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        for name, most, why in _LIMITS:
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be at most {most}; got {getattr(self, name)!r}: {why}.")
        for name in ("window", "n_random"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {getattr(self, name)!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}.")
        if not isinstance(self.transform, LogitTransform):
            raise TypeError(f"transform must be a LogitTransform; got {type(self.transform).__name__}.")
        if not isinstance(self.thresholds, TokenThresholds):
            raise TypeError(f"thresholds must be a TokenThresholds; got {type(self.thresholds).__name__}.")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"ci_level must lie in (0, 1), e.g. 0.95; got {self.ci_level}.")
        if self.bootstrap_unit not in ("row", "prompt"):
            raise ValueError(f'bootstrap_unit must be "row" or "prompt"; got {self.bootstrap_unit!r}.')
        if self.reward is not None and self.reward not in get_args(RewardName):
            raise ValueError(
                f"reward must be one of {list(get_args(RewardName))} (or null: the run's update.reward); "
                f"got {self.reward!r}."
            )
        compile_patterns(self.patterns, "patterns")
        compile_patterns(self.self_correction, "self_correction")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["transform"], d["thresholds"] = self.transform.to_dict(), self.thresholds.to_dict()
        return d
