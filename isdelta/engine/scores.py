"""The engine's result: :class:`SequenceScores`, per-position and per-row scores of a batch."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["SequenceScores"]


@dataclass(frozen=True)
class SequenceScores:
    """Scores of a rollout batch under one model (nats; bits = nats / ln 2).

    Attributes
    ----------
    token_logp : FloatTensor [N, C]  log p(token) under the sampling transform; 0 where not counted.
    token_entropy : FloatTensor [N, C]  entropy of the full next-token distribution.
    token_varentropy : FloatTensor [N, C]  Var[−log p] under it.
    mask : BoolTensor [N, C]  counted positions.
    logp : DoubleTensor [N]  S_i = Σ_t token_logp.
    length : LongTensor [N]  L_i = counted tokens.
    entropy_sum : DoubleTensor [N]  Σ_t token_entropy (the Rao–Blackwellised term).
    group : LongTensor [N]  prompt of each row.
    stopped : BoolTensor [N]  the row ends with a stop token.
    stop_entropy_sum : DoubleTensor [N]  Σ_t Σ_{e ∈ eos} −p_t(e) log p_t(e): the stop tokens' share
        of ``entropy_sum`` (subtract it for the entropy of non-stop tokens, ``include="no_eos"``).
    """

    token_logp: torch.Tensor
    token_entropy: torch.Tensor
    token_varentropy: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    length: torch.Tensor
    entropy_sum: torch.Tensor
    group: torch.Tensor
    stopped: torch.Tensor
    stop_entropy_sum: torch.Tensor

    @property
    def mean_logp(self) -> torch.Tensor:
        """S_i / L_i [N] (float64); NaN where L_i = 0 (see ``empty``)."""
        L = self.length.double()
        return torch.where(L > 0, self.logp / L.clamp(min=1), torch.full_like(L, float("nan")))

    @property
    def empty(self) -> torch.Tensor:
        """Rows [N] with no counted token (an immediate stop with include_eos=False)."""
        return self.length == 0

    @property
    def stop_logp(self) -> torch.Tensor:
        """log p of the counted stop token per row [N] (0 when none): subtract it to exclude EOS."""
        last = (self.length - 1).clamp(min=0)
        v = self.token_logp.gather(1, last[:, None]).squeeze(1).double()
        counted = self.stopped & (self.length > 0) & self.mask.gather(1, last[:, None]).squeeze(1)
        return torch.where(counted, v, torch.zeros_like(v))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every field and derived array as numpy (detached, on CPU)."""
        names = [f.name for f in fields(self)] + ["mean_logp", "empty", "stop_logp"]
        return {n: getattr(self, n).detach().cpu().numpy() for n in names}
