"""Write one benchmark's section of docs/benchmarks.md between its markers, leaving the rest alone."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, text: str, append_row: str | None = None) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` (appended if absent).

    With `append_row`, an existing section keeps its table and gains the row (one row per model).
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), doc, flags=re.DOTALL)
    if match and append_row:
        key = append_row.split("|")[1]
        lines = [
            line
            for line in match.group(1).splitlines()
            if not (line.startswith("|") and line.split("|")[1] == key)
        ]
        text = "\n".join([*lines, append_row])
    block = f"{begin}\n{text}\n{end}"
    doc = doc.replace(match.group(0), block) if match else doc.rstrip() + f"\n\n{block}\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(doc)
