"""A parser for the "Tables" section of gitlab-ml-schema.md (a copy lives in fixtures/).

The schema-fidelity test compares a live database against this parse of the spec,
not against the toolkit's own SQLAlchemy definitions, so a transcription mistake in
``toolkit/schema/gitlab.py`` cannot hide behind itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SPEC = Path(__file__).parent / "fixtures" / "gitlab-ml-schema.md"


@dataclass
class SpecTable:
    name: str
    columns: list[tuple[str, str, bool, str | None]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    foreign_keys: list[tuple[str, str, str, str]] = field(default_factory=list)
    indexes: dict[str, str] = field(default_factory=dict)  # name -> expected indexdef tail
    triggers: list[tuple[str, str]] = field(default_factory=list)  # (name, description)


def parse_spec(path: Path = SPEC) -> dict[str, SpecTable]:
    text = path.read_text()
    tables_section = text.split("\n## Tables\n", 1)[1]
    tables: dict[str, SpecTable] = {}
    for block in re.split(r"\n### ", tables_section)[1:]:
        name = re.match(r"`(\w+)`", block)[1]
        table = tables[name] = SpecTable(name)
        section = None
        for line in block.splitlines()[1:]:
            if m := re.match(r"\| `(\w+)` \| ([^|]+?) \| (yes)? *\| ?([^|]*?) ?\|$", line):
                table.columns.append((m[1], m[2].strip(), m[3] == "yes", m[4].strip() or None))
            elif line.startswith("CHECK:"):
                table.checks = re.findall(r"`([^`]+)`", line)
            elif line.startswith("Foreign keys:"):
                for fk in line.split(":", 1)[1].split(";"):
                    m = re.search(r"`(\w+)` → `(\w+)\.(\w+)` \((.+)\)", fk)
                    table.foreign_keys.append((m[1], m[2], m[3], m[4]))
            elif line.startswith("Indexes:"):
                section = "indexes"
            elif line.startswith("Triggers:"):
                section = "triggers"
            elif line.startswith("- ") and section == "indexes":
                m = re.match(r"- (unique )?`(\w+)` (.+)$", line)
                tail = m[3].replace("`", "")
                table.indexes[m[2]] = f"{'UNIQUE ' if m[1] else ''}INDEX {m[2]} ON {{schema}}.{name} USING {tail}"
            elif line.startswith("- ") and section == "triggers":
                m = re.match(r"- `(\w+)`: (.+)$", line)
                table.triggers.append((m[1], m[2]))
    return tables
