"""The monitor's engine: one ``LogProbEngine`` whose fused-or-eager path is decided once, then pinned.

``EngineConfig(fused="auto")`` decides per score call from the call's size (``engine/fused.py``),
which keeps a monitor eager at every step whose single call stays below the compile's break-even
(a 16k-token step of SmolLM2 is 8.1e8 logits a call against 2**30), although the run pays the
compile once and saves on every step. A monitor scores the same kind of batch at each measured
step, so it decides once, at its first scored batch, as if the run measured ``MONITOR_STEPS``
steps like it (two score calls a step, p0 and p1; one where the trainer's ``old_logp`` stands in
for p0), and then scores every step with that answer as ``fused="on"`` or ``"off"``. p0 and p1 of
one step, and of every later step, take one path whatever else compiles in the process meanwhile:
scoring the model twice stays bit-identical (ΔH = 0 exactly when p1 = p0).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isdelta.engine.fused import MONITOR_STEPS
from isdelta.engine.logprob import EngineConfig, LogProbEngine
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.scores import SequenceScores
from isdelta.engine.split import SplitLM

__all__ = ["PinnedEngine"]


class PinnedEngine:
    """``LogProbEngine(config)`` with ``fused`` fixed at the first :meth:`score` call.

    Attributes
    ----------
    config : EngineConfig  as given, then with ``fused`` "on" or "off" once pinned.
    fused : bool or None  the path of every call (True: the compiled statistics); None until the
        first call. A failed compile makes it False after that call: its chunks ran eagerly.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config, self.fused = config, None

    def score(self, model: torch.nn.Module, rollouts: Rollouts, passes: int) -> SequenceScores:
        """``LogProbEngine.score``; ``passes``: score calls a measured step makes (2: p0 and p1)."""
        lm = SplitLM.of(model)
        n_logits = int(rollouts.mask(self.config.include_eos).sum()) * lm.vocab_size
        engine = LogProbEngine(self.config)
        if self.fused is None:
            on = engine.fuses(n_logits, lm.device, calls=passes * MONITOR_STEPS)
            self.config = replace(self.config, fused="on" if on else "off")
            engine = LogProbEngine(self.config)
        scores = engine.score(model, rollouts)
        self.fused = engine.fuses(n_logits, lm.device)  # the path taken: False if the compile failed
        return scores
