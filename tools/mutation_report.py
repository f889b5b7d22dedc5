"""Kill ratio per module of the last `mutmut run` (make mutation), and the surviving mutants.

    .venv/bin/python tools/mutation_report.py [--survivors]

Reads `mutmut results --all true`. A mutant counts as killed when a test failed on it or timed out
(the mutant made a test hang); "survived" and "no tests" (no fast test runs the function) count as
not killed. Mutants a run left unchecked (`mutmut run "pipeline_lib.models.losses*"` runs one
module's) are left out of the ratios and counted on their own line. Mutants on lines marked
`# pragma: no mutate` are not generated at all: each such line is judged equivalent in
docs/mutation.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout"}
LINE = re.compile(
    r"^\s*(?P<module>[\w.]+)\.x(?:ǁ\w+ǁ)?_?(?P<function>\w+?)__mutmut_\d+: (?P<status>.+)$"
)


def main() -> None:
    output = subprocess.run(
        ["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors, unchecked = [], 0
    for line in output.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        status = match["status"].strip()
        if status == "not checked":
            unchecked += 1
            continue
        counts[match["module"]][status] += 1
        if status not in KILLED:
            survivors.append(line.strip())
    total_killed = total = 0
    for module, count in sorted(counts.items()):
        killed, n = sum(count[s] for s in KILLED), sum(count.values())
        total_killed, total = total_killed + killed, total + n
        rest = ", ".join(f"{s} {c}" for s, c in sorted(count.items()) if s not in KILLED)
        print(f"{module}: {killed}/{n} killed ({killed / n:.1%}); {rest or 'none left'}")
    if total:
        print(f"all: {total_killed}/{total} killed ({total_killed / total:.1%})")
    if unchecked:
        print(f"not checked in this run: {unchecked} mutants (left out above)")
    if "--survivors" in sys.argv:
        print("\n".join(survivors))


if __name__ == "__main__":
    main()
