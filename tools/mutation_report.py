"""The mutation score of each module from mutmut's results in ``mutants/`` (``nox -s mutation``, docs/testing.md).

mutmut prints one total for the whole run; this reads the results it keeps per source file
(``mutants/<path>.meta``), prints a table and writes it, with the names of the surviving mutants (``mutmut show NAME``
prints one's diff), to ``mutants/mutation-report.md``.
"""

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

OTHERS = ("survived", "timeout", "no tests", "suspicious", "segfault", "not checked")


def main() -> int:
    rows, survivors, total = [], [], Counter()
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        results = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status_by_exit_code[code] for code in results.values())
        survivors += sorted(name for name, code in results.items() if status_by_exit_code[code] == "survived")
        rows.append((str(meta.relative_to("mutants"))[: -len(".meta")], len(results), counts))
        total.update(counts)
    rows.append(("all", sum(n for _, n, _ in rows), total))
    lines = ["| module | killed / total | score | " + " | ".join(OTHERS) + " |", "|---" * (len(OTHERS) + 3) + "|"]
    for path, n, counts in rows:
        score = f"{100 * counts['killed'] / n:.1f} %" if n else "-"
        others = " | ".join(str(counts[c]) for c in OTHERS)
        lines.append(f"| {path} | {counts['killed']} / {n} | {score} | {others} |")
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    Path("mutants/mutation-report.md").write_text(report + "\nSurvivors:\n\n" + "\n".join(survivors) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
