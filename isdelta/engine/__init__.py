"""torch + transformers: rollout layout, masks, models, sampling and the log-prob engine."""

from isdelta.engine.logprob import EngineConfig, LogProbEngine, SequenceScores
from isdelta.engine.masking import completion_mask, first_stop_index, position_ids
from isdelta.engine.models import builtin_models, check_compatible, load_model
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.sampling import Samples, sample
from isdelta.engine.transform import LogitTransform

__all__ = [
    "EngineConfig", "LogProbEngine", "LogitTransform", "Rollouts", "SequenceScores",
    "builtin_models", "check_compatible", "completion_mask", "first_stop_index", "load_model",
    "position_ids", "Samples", "sample",
]
