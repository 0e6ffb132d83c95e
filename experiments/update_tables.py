"""Write the augmentation tables of the README, docs/ and the model cards from the studies' results.json.

A table is marked in the markdown by two comments; the first names the study's results, the score and the rows:

    <!-- augment-table results=experiments/reports/STUDY/results.json key=macro_f1 rows=real;real+synthetic (2x) -->
    | ...the table, rewritten by this script... |
    <!-- /augment-table -->

    python experiments/update_tables.py            # rewrite every marked table
    python experiments/update_tables.py --check    # exit 1 if one differs from its results.json (tests/test_docs.py)

`key=` accuracy or macro_f1 (mean ± std, change against real), or classwise (F1 per class, `fractions=0.01,0.1`).
`key=sampling` compares studies that differ in their generator or its sampling settings, one line each, on one
row at one fraction: `studies=PATH;PATH fraction=0.1 row=real+synthetic (2x)` (val and test macro-F1).
`rows=` (';'-separated row labels, in order; default every row), `cpu=1` (CPU minutes in each cell), `label=` (the
first column's heading; '_' for spaces).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bloodgen_hf.evaluation.augment_study import classwise_table, sampling_table, study_table, summarize_study

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"(<!-- augment-table (.*?) -->\n)(.*?)(<!-- /augment-table -->)", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "model_cards").glob("*.md"))]


def settings(text: str) -> dict[str, str]:
    """`results=PATH key=K rows=a;b c` -> {'results': PATH, 'key': K, 'rows': 'a;b c'}: a value runs to the
    next key."""
    return {k: v.strip() for k, v in re.findall(r"(\w+)=(.*?)(?=\s+\w+=|$)", text)}


def table(text: str) -> str:
    """The table a marker asks for, from its results.json."""
    options = settings(text)
    if options["key"] == "sampling":
        studies = [json.loads((ROOT / path).read_text()) for path in options["studies"].split(";")]
        return "\n".join(sampling_table(studies, float(options["fraction"]), options["row"])) + "\n"
    results = json.loads((ROOT / options["results"]).read_text())
    rows = options["rows"].split(";") if "rows" in options else None
    label = options.get("label", "training_set").replace("_", " ")
    summary = summarize_study(results["runs"])
    if options["key"] == "classwise":
        fractions = [float(f) for f in options["fractions"].split(",")] if "fractions" in options else None
        lines = classwise_table(summary, results["class_names"], rows, fractions)
    else:
        lines = study_table(summary, options["key"], options.get("cpu") == "1", rows, label)
    return "\n".join(lines) + "\n"


def updated(markdown: str) -> str:
    return MARKED.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        new = updated(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"{'out of date' if args.check else 'rewrote'}: {path}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
