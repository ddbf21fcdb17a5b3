"""docs/fidelity.md cites this package as `path:line` followed by a name; each must still be on that line."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`((?:mokd_scale|tools|tests)/[\w/]+\.py):(\d+)` `(\w+)`")


def test_every_reference_to_this_package_points_at_its_name():
    text = (REPO / "docs" / "fidelity.md").read_text()
    references = REFERENCE.findall(text)
    assert len(references) >= 20
    stale = []
    for path, line, name in references:
        lines = (REPO / path).read_text().splitlines()
        if int(line) > len(lines) or name not in lines[int(line) - 1]:
            stale.append(f"{path}:{line} {name}")
    assert not stale, "docs/fidelity.md points at moved code: " + ", ".join(stale)
