"""Counts in words: ``1 part``, ``2 parts``, ``1 batch``, ``3 batches``.

Every message that says how many of something says it through :func:`counted`, so a run
that changed one row never says "1 rows" (an operator reads a wrong plural as a wrong number).
"""

from __future__ import annotations


def plural(noun: str) -> str:
    """English plural of ``noun`` (its last word, for ``schema change``)."""
    head, _, last = noun.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def counted(n: int, noun: str, many: str | None = None) -> str:
    """``n`` and the noun, singular for exactly one: ``counted(1, "part")`` is ``1 part``.
    Thousands are not grouped (history and JSON quote the same numbers); ``many`` is the
    plural where it is not the regular one."""
    return f"{n} {noun if n == 1 else (many or plural(noun))}"
