"""One way to show a moment: ``2026-12-02 06:57:06 UTC``, whatever it came from.

History rows come from PostgreSQL as aware datetimes, fingerprints carry ISO strings; an
operator comparing the two should not have to translate between formats or time zones.
"""

from __future__ import annotations

from datetime import UTC, datetime


def shown(moment: datetime | str | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
