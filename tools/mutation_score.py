"""Print the share of mutants killed by the last ``mutmut run`` (``make mutate``) and name the survivors.

Reads ``mutants/mutmut-cicd-stats.json`` (``mutmut export-cicd-stats``) for the counts and ``mutmut results`` for
the survivors. A mutant that timed out counts as killed (the tests noticed: the code hung); one that no test
reaches counts against the score.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    stats = json.loads((ROOT / "mutants" / "mutmut-cicd-stats.json").read_text())
    killed = stats["killed"] + stats["timeout"]
    judged = killed + stats["survived"] + stats["no_tests"] + stats["suspicious"] + stats["segfault"]
    results = subprocess.run([str(pathlib.Path(sys.executable).parent / "mutmut"), "results"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    survivors = [line.strip() for line in results.splitlines() if line.strip()]
    print("\n".join(survivors))
    print(f"mutants: {stats['total']}, killed {stats['killed']}, timed out {stats['timeout']}, survived "
          f"{stats['survived']}, no tests {stats['no_tests']}, suspicious {stats['suspicious']}, "
          f"skipped {stats['skipped']}")
    print(f"killed: {killed} of {judged} = {100 * killed / max(judged, 1):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
