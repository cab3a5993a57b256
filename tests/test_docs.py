"""The repository is self-contained: no file points to working notes kept outside it or
cites a paper by an opaque file id; the mathematics lives in docs/math.md, and papers are
cited by author and year (docs/math.md §10)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The outside notes' file name, and the papers' file ids (three digits 000–004 and an
#: underscore). Spelled in pieces so that this file does not match itself.
NOTES = "MATH" + ".md"
FORBIDDEN = re.compile(re.escape(NOTES) + r"|\b00[0-4]" + "_")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        names = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts
        ]
    files = []
    for name in names:
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # images and other binary files
            continue
        files.append(path)
    return files


def test_no_file_refers_to_outside_notes_or_paper_file_ids():
    hits = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "point to docs/math.md and cite papers by author/year:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_should():
    paper = "00" + "3_…"
    for bad in (f"see {NOTES}, K-FAC", f"(`{paper}` eq. 4)", f"({paper} §5)", "0" + "04_ tunes"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("docs/math.md §2", "Tang et al. 2021", "1e-3", "x_000", "2000_steps"):
        assert not FORBIDDEN.search(fine), fine


@pytest.mark.parametrize("section", ["## 1. Notation", "## 9. Where", "## 10. References"])
def test_math_page_exists_with_its_sections(section):
    assert section in (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
