"""Docs stay true: the spec reference matches `temper schema --markdown`; README's commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from temper.spec.reference import BEGIN, END, render_reference

ROOT = Path(__file__).resolve().parents[2]


def test_job_spec_reference_is_generated_from_the_schema() -> None:
    text = (ROOT / "docs" / "job-spec.md").read_text()
    assert BEGIN in text and END in text, "docs/job-spec.md lost its GENERATED markers"
    body = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert body == render_reference(), (
        "docs/job-spec.md is out of date: regenerate it with "
        "`python -m temper.spec.reference_update` (or `temper schema --markdown`)"
    )


def test_readme_opens_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block


def test_docs_link_targets_exist() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(((?!http)[^)#]+)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
