"""The run's inputs: the data file's records (checked before any work), their content hash, and
the reference responses as rollouts; RunError."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from isdelta.program import ProgramError
from isdelta.run.config import RunConfig

__all__ = [
    "RunError",
    "check_context",
    "check_prompts",
    "check_records",
    "data_path",
    "load_records",
    "prompt_lengths",
    "records_digest",
    "sft_rollouts",
]


class RunError(ProgramError, RuntimeError):
    """A run that cannot proceed (unusable data, a model that does not fit); the message says
    what, why and the fix. Exit code 2 unless given."""


def data_path(cfg: RunConfig) -> Path:
    """The data file: a path, or ``builtin:NAME`` for ``isdelta/data/NAME.jsonl``."""
    d = cfg.data
    if d.path.startswith("builtin:"):
        from importlib.resources import files

        return Path(str(files("isdelta") / "data" / f"{d.path.split(':', 1)[1]}.jsonl"))
    return Path(d.path).expanduser()


def load_records(cfg: RunConfig) -> list[dict]:
    """The prompts (str or chat messages), answers and reference responses of the data file;
    each record keeps its ``line`` for messages."""
    d, path = cfg.data, data_path(cfg)
    if not path.is_file():
        raise RunError(
            f"data.path: {path} does not exist" + (" as a file" if path.exists() else ""),
            fix="give a jsonl file (one JSON object per line), or builtin:math",
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RunError(f"data.path: {path} is not UTF-8 text", str(e), "save it as UTF-8 jsonl") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        records.append(_record(cfg, path, n, line))
        if d.limit and len(records) >= d.limit:
            break
    if not records:
        raise RunError(f"data.path: {path} holds no prompts", fix="give a jsonl file with one object per prompt")
    return records


def _record(cfg: RunConfig, path: Path, n: int, line: str) -> dict:
    """One jsonl line as a record; RunError naming the line when it is not one."""
    d = cfg.data
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RunError(f"{path}:{n}: not valid JSON", e.msg, "one JSON object per line") from None
    if not isinstance(row, dict):
        raise RunError(
            f"{path}:{n}: a JSON {type(row).__name__}, not an object",
            f"got {line.strip()[:60]!r}",
            f'write each line as an object, e.g. {{"{d.prompt_field}": "...", "{d.answer_field}": "..."}}',
        )
    if d.messages_field in row:
        prompt = _messages(row[d.messages_field], f"{path}:{n}", d.messages_field)
    elif d.prompt_field in row:
        prompt = row[d.prompt_field]
        if not isinstance(prompt, str):
            raise RunError(
                f"{path}:{n}: '{d.prompt_field}' is a {type(prompt).__name__}",
                "a prompt is a string (or a chat message list under data.messages_field)",
                "make it a string",
            )
        if d.chat_template:
            prompt = [{"role": "user", "content": prompt}]
    else:
        raise RunError(
            f"{path}:{n}: no '{d.prompt_field}' or '{d.messages_field}' field",
            f"keys: {sorted(row)}",
            "set data.prompt_field / data.messages_field",
        )
    return {"prompt": prompt, "answer": row.get(d.answer_field), "response": row.get(d.response_field), "line": n}


def _messages(value, where: str, field: str) -> list[dict]:
    """A chat: a non-empty list of {"role": str, "content": str} (RunError naming the line)."""
    example = f'"{field}": [{{"role": "user", "content": "..."}}]'
    if isinstance(value, str):
        raise RunError(
            f"{where}: '{field}' is a string, not a list of chat messages",
            "a chat prompt is sent through the chat template; a string there would be sent without it",
            f"write {example}, or put a plain prompt under data.prompt_field",
        )
    if not isinstance(value, list):
        bad = f"is a {type(value).__name__}"
    elif not value:
        bad = "is empty"
    else:
        bad = next(
            (
                f"message {i} is not an object with a string 'role' and 'content' (got {str(m)[:60]!r})"
                for i, m in enumerate(value)
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str))
            ),
            None,
        )
    if bad:
        raise RunError(f"{where}: '{field}' {bad}", "a chat prompt is a list of messages", f"write {example}")
    return value


def records_digest(records: list[dict]) -> str:
    """Hash of what the run reads from the data file (prompts, answers, responses, in order):
    part of the output folder's stamp, so an edited data file never reuses old samples."""
    body = [[r["prompt"], r["answer"], r["response"]] for r in records]
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_records(cfg: RunConfig, records: list[dict]) -> None:
    """What the chosen loss and token mode read from each record is there (before any work)."""
    d = cfg.data
    need = []
    if cfg.update is not None and cfg.update.loss == "reinforce":
        need.append(("answer", d.answer_field, "update.loss=reinforce (the reward compares to it)"))
    if cfg.update is not None and cfg.update.loss == "sft":
        need.append(("response", d.response_field, "update.loss=sft"))
    if cfg.tokens is not None and cfg.tokens.mode in ("teacher_forced", "both"):
        need.append(("response", d.response_field, f"tokens.mode={cfg.tokens.mode}"))
    for key, field, why in need:
        missing = [r["line"] for r in records if r[key] is None or r[key] == ""]
        if missing:
            raise RunError(
                f"data.path: lines {missing[:5]}{' …' if len(missing) > 5 else ''} have no '{field}'",
                f"{why} needs one on every record",
                f"add the field, or point data.{key}_field at the field that holds it",
            )


def check_prompts(cfg: RunConfig, model, tok, records: list[dict]) -> None:
    """Every prompt encodes as the sampler will encode it, and fits the model's context with
    ``sampling.max_new_tokens`` (RunError naming the data lines), before the first sample."""
    from isdelta.engine import context_size

    check_context(cfg, prompt_lengths(cfg, tok, records), context_size(model), "the model's")


def prompt_lengths(cfg: RunConfig, tok, records: list[dict]) -> list[tuple[int, int]]:
    """``(data line, prompt tokens)`` per record, encoded as the sampler encodes it (RunError
    naming the line of a prompt that cannot be encoded)."""
    from isdelta.engine.sampling import encode_prompts

    path = data_path(cfg)
    lengths = []
    for r in records:
        try:
            (ids,), _ = encode_prompts(tok, [r["prompt"]])
        except ValueError as e:
            fix = "set data.chat_template: false" if "chat_template" in str(e) else "fix that record"
            raise RunError(
                f"{path}:{r['line']}: the prompt cannot be encoded", str(e).replace("prompt 0 ", "it "), fix
            ) from None
        lengths.append((r["line"], len(ids)))
    return lengths


def check_context(cfg: RunConfig, lengths: list[tuple[int, int]], n: int | None, whose: str) -> None:
    """RunError naming the data lines whose prompt + ``sampling.max_new_tokens`` exceed a context of
    ``n`` positions (``whose``: "the model's", "checkpoints.2's"); None: the config does not say."""
    new = cfg.sampling.max_new_tokens
    over = [(line, L) for line, L in lengths if n is not None and L + new > n]
    if over:
        raise RunError(
            f"{data_path(cfg)}: lines {[line for line, _ in over[:5]]}{' …' if len(over) > 5 else ''} do not fit "
            f"{whose} context of {n} positions",
            f"line {over[0][0]}'s prompt has {over[0][1]} tokens + sampling.max_new_tokens {new}",
            "shorten those prompts, lower sampling.max_new_tokens, or drop them (data.limit)",
        )


def sft_rollouts(tok, records: list[dict], cfg: RunConfig, why: str = "update.loss=sft"):
    """Prompt + reference response (+ EOS) per record: the sft update's batch, and the token
    stage's teacher-forced carrier. ``why`` names the setting that needs the responses."""
    from isdelta.engine import Rollouts

    missing = [i for i, r in enumerate(records) if not r["response"]]
    if missing:
        raise RunError(
            f"{why} needs a reference response ('{cfg.data.response_field}') for every prompt",
            f"records {missing[:5]} have none",
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
        comps.append(tok(str(r["response"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
