"""Make ``isdelta/data/math_answers.jsonl``: the embedded model's own answers to arithmetic
prompts, each marked correct or not — the labelled demo corpus of ``configs/predictor_demo.yaml``.

    .venv/bin/python examples/make_math_answers.py     # ~5 CPU-minutes (11 min wall on a busy 2-core box)

Prompts: the 12 of ``isdelta/data/math.jsonl`` plus 48 generated below (sums, differences and
products from one-digit to three-digit numbers, so that some are easy for a 135M model and some
are not). Each prompt is sent as a user chat turn to SmolLM2-135M-Instruct, and ``SAMPLES``
answers are sampled with ``isdelta.engine.sample`` at temperature 1 (the distribution the score
program then scores) and graded by ``isdelta.training.REWARDS["answer_match"]`` (the last number
in the answer equals the reference). One row per answer::

    {"id": "q07-s1", "prompt": ..., "answer": "12", "text": <the model's answer>, "label": 1,
     "stop": "eos" | "length", "group": 7}

The seed and settings are fixed, so a rerun on the same versions writes the same file; the
sibling ``math_answers.txt`` records the settings, versions and accuracy of the shipped file.
"""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path

SEED = 0
SAMPLES = 2  # answers per prompt
MAX_NEW_TOKENS = 48
MODEL = "smollm2-135m-instruct"
SUFFIX = " Give the final answer as a number."


def generated_prompts(n: int = 48, seed: int = SEED) -> list[dict]:
    """``n`` arithmetic questions, a third each of sums, differences and products, by size."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        digits = 1 + (i % 12) // 4  # 1, 2 or 3 digits, in turn
        lo, hi = 10 ** (digits - 1), 10**digits - 1
        a, b = rng.randint(max(lo, 2), hi), rng.randint(max(lo, 2), hi)
        kind = i % 3
        if kind == 0:
            q, ans = f"What is {a} + {b}?", a + b
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q, ans = f"What is {a} - {b}?", a - b
        else:
            b = rng.randint(2, 9) if digits == 3 else b  # three-digit times one-digit at most
            q, ans = f"What is {a} times {b}?", a * b
        out.append({"prompt": q + SUFFIX, "answer": str(ans)})
    return out


def main() -> None:
    import importlib.metadata as md

    from isdelta.engine import LogitTransform, load_model, sample
    from isdelta.training import REWARDS

    data = Path(str(files("isdelta") / "data"))
    shipped = [json.loads(x) for x in (data / "math.jsonl").read_text().splitlines() if x.strip()]
    prompts = [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in shipped] + generated_prompts()
    model, tok = load_model(MODEL, dtype="float32")
    s = sample(
        model,
        tok,
        [[{"role": "user", "content": p["prompt"]}] for p in prompts],
        num_samples=SAMPLES,
        transform=LogitTransform(temperature=1.0),
        max_new_tokens=MAX_NEW_TOKENS,
        seed=SEED,
    )
    rows = []
    for r, (text, stop) in enumerate(zip(s.texts, s.stop_reason)):
        q, g = prompts[r // SAMPLES], r % SAMPLES
        label = int(REWARDS["answer_match"](text, q["answer"]) > 0)
        rows.append(
            {
                "id": f"q{r // SAMPLES:02d}-s{g}",
                "prompt": q["prompt"],
                "answer": q["answer"],
                "text": text,
                "label": label,
                "stop": stop,
                "group": r // SAMPLES,
            }
        )
    (data / "math_answers.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    acc = sum(x["label"] for x in rows) / len(rows)
    note = (
        "math_answers.jsonl: SmolLM2-135M-Instruct's own answers to arithmetic prompts, marked correct (label 1)\n"
        "or not (label 0). Made by examples/make_math_answers.py (run once; rerun it to remake the file).\n\n"
        f"prompts: the {len(shipped)} of math.jsonl + {len(prompts) - len(shipped)} generated (random.Random({SEED}))\n"
        f"model: {MODEL} (float32, CPU), chat template, user turn = prompt\n"
        f"sampling: isdelta.engine.sample, temperature 1.0, no top-k/top-p, {SAMPLES} answers per prompt, "
        f"max_new_tokens {MAX_NEW_TOKENS}, seed {SEED}\n"
        'grading: isdelta.training.REWARDS["answer_match"] (the last number in the answer equals the reference)\n'
        f"rows: {len(rows)}; correct: {sum(x['label'] for x in rows)} (accuracy {acc:.3f}); "
        f"cut at max_new_tokens: {sum(x['stop'] == 'length' for x in rows)}\n"
        f"versions: torch {md.version('torch')}, transformers {md.version('transformers')}\n"
    )
    (data / "math_answers.txt").write_text(note)
    print(note)


if __name__ == "__main__":
    main()
