"""Check that the installed packages are the versions ``requirements.txt`` pins (``name==version``): the image's
build runs it after installing, so an image whose torch, megatron-core or PyTriton differs from what the tests
ran against does not build.

    python docker/check_pins.py [requirements.txt]

Exit 0 when every pinned package is installed at its pin (a local build tag such as ``+cpu`` or ``+cu126`` does
not count: the same release built for another device), 1 with a line per difference otherwise.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

from packaging.requirements import Requirement
from packaging.version import Version


def pins(text: str) -> dict[str, str]:
    """``name: version`` for each ``name==version`` line (extras, markers and comments dropped)."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            found[requirement.name.lower()] = exact[0]
    return found


def differences(pinned: dict[str, str]) -> list[str]:
    lines = []
    for name, version in sorted(pinned.items()):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name}: pinned {version}, not installed")
            continue
        if Version(installed).public != Version(version).public:
            lines.append(f"{name}: pinned {version}, installed {installed}")
    return lines


def main(argv: list[str]) -> int:
    path = pathlib.Path(argv[1] if len(argv) > 1 else "requirements.txt")
    problems = differences(pins(path.read_text()))
    for line in problems:
        print(f"{path}: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
