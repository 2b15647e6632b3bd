"""Rewrite docs/job-spec.md's generated section from the schema: `python -m temper.spec.reference_update`."""

from __future__ import annotations

import sys
from pathlib import Path

from temper.spec.reference import BEGIN, END, render_reference


def main(path: str = "docs/job-spec.md") -> int:
    doc = Path(path)
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{render_reference()}{END}{tail}")
    print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
