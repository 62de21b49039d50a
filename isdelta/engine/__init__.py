"""torch + transformers: rollout layout, masks, models, sampling and the log-prob engine.

- ``rollouts`` / ``masking``  the batch layout and the completion mask (DESIGN.md §2–§3)
- ``models``                  loading (builtin GGUF, HF folders, hub ids) and tokenizer checks
- ``sampling`` / ``samples``  G completions per prompt with HF ``generate`` (or vLLM: ``vllm_sampling``), and their result
- ``transform``               the sampling transform (temperature → top-k → top-p)
- ``split`` / ``logprob``     the model as body + head, and the batched, masked log-prob engine
"""

from isdelta.engine.logprob import EngineConfig, LogProbEngine
from isdelta.engine.masking import completion_mask, first_stop_index, position_ids
from isdelta.engine.models import builtin_models, check_compatible, context_size, load_model, load_tokenizer
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.samples import Samples
from isdelta.engine.sampling import sample
from isdelta.engine.scores import SequenceScores
from isdelta.engine.split import SplitLM
from isdelta.engine.transform import LogitTransform

__all__ = [
    "EngineConfig",
    "LogProbEngine",
    "LogitTransform",
    "Rollouts",
    "Samples",
    "SequenceScores",
    "SplitLM",
    "builtin_models",
    "check_compatible",
    "completion_mask",
    "context_size",
    "first_stop_index",
    "load_model",
    "load_tokenizer",
    "position_ids",
    "sample",
]
