"""The README stays true to the code: its CONTRIBUTING layout names every module, its timing line is
the line the code prints for those figures, and it shows the stdin/JSONL pipeline."""

from __future__ import annotations

import re
from pathlib import Path

from longdoc_cli.timing import RunStats

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def contributing_layout() -> str:
    section = README.split("## CONTRIBUTING", 1)[1]
    return section.split("- Structure:", 1)[0]


def test_the_layout_names_every_module():
    layout = contributing_layout()
    package = ROOT / "longdoc_cli"
    modules = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    modules += [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    for sub in ("bench",):
        modules += [
            p.name for p in (package / sub).glob("*.py") if p.name not in ("__init__.py", "__main__.py")
        ]
    missing = [m for m in modules if f"`{m}`" not in layout and f"`longdoc_cli/{m}`" not in layout]
    assert not missing, f"README CONTRIBUTING layout lacks {missing}"
    assert "`longdoc/`" in layout  # the import-longdoc alias package


def test_the_timing_line_is_the_one_the_code_prints():
    lines = [x.strip() for x in README.splitlines() if x.strip().startswith("longdoc: classify: ")]
    assert lines, "README shows no timing line"
    shown = lines[0]
    m = re.fullmatch(
        r"longdoc: classify: (\d+) documents, ([\d,]+) windows, ([\d,]+) tokens \| load ([\d.]+) s, "
        r"compute \S+, total (\d+)m(\d+)s \| ([\d,]+) tokens/s, [\d.]+ documents/s \| (\w+) (\w+)",
        shown,
    )
    assert m, shown
    docs, windows, tokens = int(m[1]), int(m[2].replace(",", "")), int(m[3].replace(",", ""))
    rate = int(m[7].replace(",", ""))
    total = int(m[5]) * 60 + int(m[6])
    stats = RunStats("classify", device=m[8], dtype=m[9], documents=docs, windows=windows, tokens=tokens,
                     load_s=float(m[4]), compute_s=tokens / rate, total_s=total)  # fmt: skip
    assert "longdoc: " + stats.line() == shown  # same fields, order, units and rounding


def test_the_stdin_jsonl_pipeline_is_shown():
    assert re.search(r"jq -c [^\n]*\| longdoc classify", README)  # JSON lines in on stdin
    assert re.search(r"cat \S+\.jsonl \| longdoc qa [^\n]*--skip-bad-lines", README)
    assert "--input-format lines" in README
