"""Model names (slugs) from experiment names, as milestone 3 needs them.

The rules, in order:

1. Unicode is decomposed (NFKD) and reduced to ASCII, so "Ünïcödé" becomes "unicode"
   (and "ß" becomes "ss", with a few other letters NFKD leaves alone); then lower case.
2. Every run of characters other than ``a-z 0-9 _ . -`` becomes one ``_``.
3. Separators (``_ . -``) are trimmed from both ends; the result is cut to 255
   characters (and trimmed again).
4. If nothing is left, the fallback is ``experiment_<iid>`` (the experiment's iid in its
   project), which is deterministic and unique among experiments of the project.
5. If the slug is taken in the project by an existing model or an earlier experiment's
   slug, ``_2``, ``_3``, … is appended (cutting the base so the whole stays ≤ 255).
   "Earlier" is by experiment id, so the dry run and the apply agree.

Every result is accepted by GitLab's model-name rule (:data:`MODEL_NAME`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MAX_LENGTH = 255
SEPARATORS = "_.-"

# Gitlab::Regex.package_name_regex, which ml_model_name_regex is: ASCII word characters,
# atomic groups as in Ruby.
MODEL_NAME = re.compile(
    r"\A@?(?>(?:[\w\-.+]*/)*)(?>[\w\-.]+@?)(?>(?:[\w\-.+]*/)*)[\w\-.]*\Z", re.ASCII
)
_OTHER = re.compile(r"[^a-z0-9_.\-]+")
# Latin letters that NFKD does not decompose into ASCII.
_TRANSLITERATE = str.maketrans({"ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O",
                                "œ": "oe", "Œ": "OE", "đ": "d", "Đ": "D", "ł": "l", "Ł": "L",
                                "þ": "th", "Þ": "TH", "ð": "d", "Ð": "D", "ı": "i"})


def is_valid_model_name(name: str) -> bool:
    return bool(name) and len(name) <= MAX_LENGTH and MODEL_NAME.match(name) is not None


def base_slug(name: str) -> str:
    """Steps 1 to 3: may return an empty string."""
    decomposed = unicodedata.normalize("NFKD", name.translate(_TRANSLITERATE))
    ascii_text = decomposed.encode("ascii", "ignore").decode("ascii")
    slug = _OTHER.sub("_", ascii_text.lower()).strip(SEPARATORS)
    return slug[:MAX_LENGTH].strip(SEPARATORS)


def fallback_slug(iid: int) -> str:
    return f"experiment_{iid}"


def with_suffix(base: str, n: int) -> str:
    suffix = f"_{n}"
    return base[: MAX_LENGTH - len(suffix)].rstrip(SEPARATORS) + suffix


def assign(name: str, iid: int, taken: set[str]) -> tuple[str, str, bool]:
    """(slug, base, fell_back) for one experiment; adds the slug to ``taken``."""
    base = base_slug(name)
    fell_back = not base
    if fell_back:
        base = fallback_slug(iid)
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = with_suffix(base, n)
    taken.add(slug)
    return slug, base, fell_back


def assign_all(experiments: Iterable[tuple[int, int, int, str]],
               taken_by_project: dict[int, set[str]]) -> dict[int, tuple[str, str, bool]]:
    """Slugs for (id, project_id, iid, name) rows, in id order; ``taken_by_project`` grows."""
    result = {}
    for exp_id, project_id, iid, name in sorted(experiments):
        result[exp_id] = assign(name, iid, taken_by_project.setdefault(project_id, set()))
    return result
