"""The ``isdelta`` console script: ``isdelta run cfg.yaml``, ``isdelta score cfg.yaml`` or
``isdelta audit BATCH.pt``.

``isdelta cfg.yaml`` (no sub-command) means ``run``. Each sub-command is also a module:
``python -m isdelta.run``, ``python -m isdelta.score`` and ``python -m isdelta.engine.audit_cli``.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = (
    "usage: isdelta {run,score} CONFIG.yaml [--set KEY=VALUE ...] [--out DIR]\n"
    "       isdelta audit BATCH.pt [--model PATH] [--eos-id ID] [...]"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            USAGE + "\n\n  run    ΔH of one update (python -m isdelta.run)\n"
            "  score  entropy statistics of a corpus (python -m isdelta.score)\n"
            "  audit  check a saved trainer batch's masks, positions and log-probs (isdelta audit --help)"
        )
        return 0 if argv else 2
    if argv[0] == "audit":
        from isdelta.engine.audit_cli import main as audit_main

        return audit_main(argv[1:])
    command = argv.pop(0) if argv[0] in ("run", "score") else "run"
    if command == "score":
        from isdelta.score import main as score_main

        return score_main(argv)
    from isdelta.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
