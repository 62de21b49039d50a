"""``isdelta audit FILE``: audit a trainer batch saved to disk (see :mod:`isdelta.engine.audit`).

``FILE`` is a dict of tensors saved with ``torch.save`` (read with ``weights_only=True``) or a
``.safetensors`` file, keyed as TRL's ``_prepare_inputs`` output (``prompt_ids``, ``prompt_mask``,
``completion_ids``, ``completion_mask``, optionally ``old_per_token_logps`` …); ``--key`` maps
other names. Exit status: 0 no findings, 1 findings, 2 bad input (an ``error: …`` line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from isdelta.engine.audit import AuditOptions, audit_batch, batch_arguments, load_batch

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="isdelta audit",
        description="Audit a saved trainer batch (prompt_ids, prompt_mask, completion_ids, completion_mask, and "
        "optionally per_token_logps / old_per_token_logps, position_ids, completion_lengths, attention_mask, "
        "loss_weights, logits). Exit 0: no findings, 1: findings, 2: bad input.",
    )
    p.add_argument("file", help="a .pt (dict of tensors, loaded with weights_only=True) or .safetensors file")
    p.add_argument("--model", help="model folder, .gguf or builtin name (isdelta.engine.load_model): model checks")
    p.add_argument("--eos-id", type=int, action="append", help="a stop id (repeat for several); default the model's")
    p.add_argument("--pad-id", type=int, help="the pad id; default the model tokenizer's")
    p.add_argument("--key", action="append", default=[], metavar="FIELD=KEY", help="read FIELD from KEY in the file")
    p.add_argument("--exclude-eos", action="store_true", help="audit a convention that does not count the stop token")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the saved log-probs (default 1)")
    p.add_argument("--tol", type=float, default=1e-3, help="per-token log-prob tolerance in nats (default 1e-3)")
    p.add_argument("--implicit-positions", action="store_true", help="the trainer passes no position_ids")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """``isdelta audit FILE``: print the report; 0 when clean, 1 with findings, 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        names = dict(_field_key(k) for k in args.key)
        batch = batch_arguments(load_batch(args.file), names)
        model = tokenizer = None
        if args.model:
            from isdelta.engine.models import load_model

            model, tokenizer = load_model(args.model)
        if args.implicit_positions and "position_ids" not in batch:
            batch["position_ids"] = "implicit"
        options = AuditOptions(include_eos=not args.exclude_eos, temperature=args.temperature, logp_tol=args.tol)
        report = audit_batch(
            **batch,
            eos_token_ids=args.eos_id,
            pad_token_id=args.pad_id,
            tokenizer=tokenizer,
            model=model,
            options=options,
        )
    except (OSError, ValueError, TypeError) as e:  # unreadable file, missing keys, wrong shapes: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


def _field_key(spec: str) -> tuple[str, str]:
    field, sep, key = spec.partition("=")
    if not sep or not field or not key:
        raise ValueError(f"--key takes FIELD=KEY (e.g. completion_mask=response_mask); got {spec!r}.")
    return field, key


if __name__ == "__main__":
    sys.exit(main())
