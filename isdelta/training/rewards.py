"""Rule rewards for the reinforce update: 1.0 when a completion's final answer matches, else 0.0.

``boxed_match`` reads the LAST complete ``\\boxed{...}`` (nested braces allowed), as MATH-style
graders do; ``answer_match`` reads the last number in the text, as GSM8K-style graders do. Numbers
compare numerically (``12`` = ``12.0`` = ``$12$``; ``1,200`` = ``1200``), other answers as strings
with whitespace and light LaTeX markup removed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = ["REWARDS", "answer_match", "boxed_match", "last_boxed", "last_number"]

# A candidate number: digits with optional comma groups and decimals, or ".5"; a sign.
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or None.

    Braces are matched by depth, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A box left
    open (a completion cut at ``max_new_tokens``) is skipped in favour of the last closed one.
    """
    found = None
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def last_number(text: str) -> float | None:
    """The last number in ``text`` (``1,000`` → 1000.0, ``-3.5`` → −3.5), or None."""
    for m in reversed(list(_NUMBER.finditer(text))):
        s, start = m.group().rstrip(","), m.start()  # "3, 4": the comma is punctuation
        if s[0] in "+-" and start and (text[start - 1].isalnum() or text[start - 1] in ")]}"):
            s, start = s[1:], start + 1  # "3-5": a difference or a range, its last number is 5
        prev = text[start - 1] if start else " "
        if prev.isalnum() or prev in "._":
            continue  # digits inside a word ("x2") or a version string ("v1.2")
        value = _to_number(s)
        if value is None and "," in s:
            value = _to_number(s.rsplit(",", 1)[-1])  # "1,2,3": a list, take its last item
        if value is not None:
            return value
    return None


def _strip_markup(s: str) -> str:
    """Drop whitespace, ``$``, ``\\(\\)``, ``\\left``/``\\right``, ``\\text{}``, thin spaces, a final dot."""
    s = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", s)
    for old, new in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\(", ""),
        ("\\)", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("{,}", ","),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
    ]:
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def _to_number(s: str) -> float | None:
    """A float for a plain, comma-grouped or ``\\frac{a}{b}`` / ``a/b`` number; None otherwise."""
    s = _strip_markup(str(s))
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        return float(s)
    m = _FRAC.match(s) or re.fullmatch(r"([-+]?)(\d+)/(\d+)", s)
    if m:
        num, den = _to_number(m.group(2)), _to_number(m.group(3))
        if num is not None and den:
            return (-1 if m.group(1) == "-" else 1) * num / den
    return None


def _same(a: str | float, b: str | float) -> bool:
    """Equal as numbers when both parse as numbers, else as normalised strings."""
    x = a if isinstance(a, (int, float)) else _to_number(a)
    y = b if isinstance(b, (int, float)) else _to_number(b)
    if x is not None and y is not None:
        return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-9)
    return _strip_markup(str(a)) == _strip_markup(str(b)) != ""


def _reference_number(answer: str | float) -> float | None:
    """The answer as a number; a GSM8K-style solution ("... #### 72") gives its final number."""
    if isinstance(answer, (int, float)):
        return float(answer)
    value = _to_number(answer)
    if value is None and "####" in answer:
        value = _to_number(answer.rsplit("####", 1)[-1])
    return value


def boxed_match(text: str, answer: str | float) -> float:
    """1.0 when the last ``\\boxed{...}`` in ``text`` equals ``answer``, else 0.0.

    Parameters
    ----------
    text : str
        A completion.
    answer : str or number
        The reference, e.g. ``"12"``, ``"\\frac{1}{2}"`` or ``12``.

    Returns
    -------
    float
        1.0 or 0.0 (0.0 when there is no complete box). Numbers compare numerically (``12``,
        ``12.0``, ``$12$``, ``1,200``, ``\\frac{1}{2}`` = ``0.5``), anything else as a string with
        whitespace and light LaTeX markup removed.
    """
    content = last_boxed(text)
    if content is None:
        return 0.0
    return float(_same(content, answer))


def answer_match(text: str, answer: str | float) -> float:
    """1.0 when the last number in ``text`` equals ``answer`` numerically, else 0.0.

    Parameters
    ----------
    text : str
        A completion. Numbers may be negative, decimal or comma-grouped (``1,000``).
    answer : str or number
        The reference number (``"72"``, ``"1,000"``, ``-3.5``); a full GSM8K solution ending in
        ``#### 72`` is read as 72.

    Returns
    -------
    float
        1.0 or 0.0 (0.0 when the text holds no number or the answer is not a number).
    """
    got, want = last_number(text), _reference_number(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


REWARDS: dict[str, Callable[[str, str | float], float]] = {"boxed_match": boxed_match, "answer_match": answer_match}
