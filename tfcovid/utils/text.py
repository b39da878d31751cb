"""Words for messages. No TensorFlow."""
from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"0 epochs"``; ``many`` where adding an "s" is wrong."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
