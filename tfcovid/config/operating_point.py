"""How an operating point is asked for (``train.operating_point``, ``--operating-point``): a
number, ``youden``, ``sensitivity:S``, ``specificity:S`` or ``threshold`` (``train.threshold``).

Only the syntax lives here (config must not need NumPy or scikit-learn); choosing the threshold
on validation data is ``tfcovid.results.operating_point``.
"""
from __future__ import annotations

import math

# "threshold": the number train.threshold (0.5 unless set), as every run before issue 23 decided.
FORMS = "a number in (0, 1), youden, sensitivity:S, specificity:S (0 <= S <= 1) or threshold"


def parse(spec, threshold: float = 0.5) -> tuple[str, float | None]:
    """``spec`` -> (kind, value): ("fixed", t), ("youden", None), ("sensitivity", s) or
    ("specificity", s). ``threshold`` is what "threshold" stands for.

    Raises:
        ValueError: a spec of none of those forms, saying which forms there are.
    """
    text = str(spec).strip().lower()
    if text == "threshold":
        return "fixed", float(threshold)
    if text == "youden":
        return "youden", None
    kind, colon, value = text.partition(":")
    number = _number(value if colon else kind)
    if colon and kind in ("sensitivity", "specificity") and number is not None and 0 <= number <= 1:
        return kind, number
    if not colon and number is not None and 0 < number < 1:
        return "fixed", number
    raise ValueError(f"Bad operating point {str(spec)!r}: use {FORMS}, e.g. sensitivity:0.95.")


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
