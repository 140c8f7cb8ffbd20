"""Copy the recorded results into README, where README quotes them.

    python tools/quote_records.py [--check]

README marks each quote with a pair of HTML comments (invisible when
rendered):

    <!-- quote: docs/demo/results.md -->
    ...the file's text, less its "# " heading...
    <!-- end quote -->

This rewrites the text between every pair from the file it names, so that
after re-running a benchmark or the demo one command brings README up to
date. With --check it changes nothing and exits 1 when a quote differs from
its file (tests/test_readme_numbers.py checks the same).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUOTE = re.compile(r"(<!-- quote: (?P<path>[^ ]+) -->\n)(?P<text>.*?)(<!-- end quote -->)", re.S)


def quotable(path: Path) -> str:
    """A record's text as README quotes it: without its "# " heading and the
    blank lines around the rest."""
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip("\n") + "\n"


def quotes(readme: str) -> dict[str, str]:
    """Path -> the text README holds for it."""
    return {m.group("path"): m.group("text") for m in QUOTE.finditer(readme)}


def requoted(readme: str, root: Path = ROOT) -> str:
    """README with every quote replaced by its file's current text."""
    return QUOTE.sub(lambda m: m.group(1) + quotable(root / m.group("path")) + m.group(4), readme)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a quote is out of date")
    args = parser.parse_args()
    path = ROOT / "README.md"
    readme = path.read_text()
    updated = requoted(readme)
    stale = [p for p, text in quotes(readme).items() if text != quotable(ROOT / p)]
    if args.check:
        print("\n".join(f"out of date: {p}" for p in stale) or "README's quotes match their files")
        return 1 if stale else 0
    path.write_text(updated)
    print(f"requoted {', '.join(quotes(readme))}" + (f" (changed: {', '.join(stale)})" if stale else " (no change)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
