"""The run's inputs: the data file's records, and the reference responses as rollouts; RunError."""

from __future__ import annotations

import json
from pathlib import Path

from isdelta.run.config import RunConfig

__all__ = ["RunError", "load_records", "sft_rollouts"]


class RunError(RuntimeError):
    """A run that cannot proceed (output folder conflict, unusable data); the message says why."""


def load_records(cfg: RunConfig) -> list[dict]:
    """The prompts (str or chat messages), answers and reference responses of the data file."""
    d = cfg.data
    if d.path.startswith("builtin:"):
        from importlib.resources import files

        path = Path(str(files("isdelta") / "data" / f"{d.path.split(':', 1)[1]}.jsonl"))
    else:
        path = Path(d.path).expanduser()
    if not path.is_file():
        raise RunError(f"data.path: {path} does not exist (use a jsonl file, or builtin:math).")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{n}: not valid JSON ({e.msg}).") from e
        if d.messages_field in row:
            prompt = row[d.messages_field]
        elif d.prompt_field in row:
            prompt = row[d.prompt_field]
            if d.chat_template:
                prompt = [{"role": "user", "content": prompt}]
        else:
            raise RunError(
                f"{path}:{n}: no '{d.prompt_field}' or '{d.messages_field}' field "
                f"(set data.prompt_field / data.messages_field); keys: {sorted(row)}."
            )
        records.append({"prompt": prompt, "answer": row.get(d.answer_field), "response": row.get(d.response_field)})
        if d.limit and len(records) >= d.limit:
            break
    if not records:
        raise RunError(f"data.path: {path} holds no prompts.")
    return records


def sft_rollouts(tok, records: list[dict], cfg: RunConfig, why: str = "update.loss=sft"):
    """Prompt + reference response (+ EOS) per record: the sft update's batch, and the token
    stage's teacher-forced carrier. ``why`` names the setting that needs the responses."""
    from isdelta.engine import Rollouts

    missing = [i for i, r in enumerate(records) if not r["response"]]
    if missing:
        raise RunError(
            f"{why} needs a reference response ('{cfg.data.response_field}') "
            f"for every prompt; records {missing[:5]} have none."
        )
    prompts, comps = [], []
    for r in records:
        p = r["prompt"]
        ids = (
            tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            if isinstance(p, list)
            else tok(p)["input_ids"]
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding here
            ids = ids["input_ids"]
        prompts.append(list(ids))
        comps.append(tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
