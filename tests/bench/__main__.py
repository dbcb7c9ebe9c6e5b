"""`make bench`: every benchmark, figures and ratios printed (never asserted)."""

from __future__ import annotations

import sys

from tests.bench import applier, planner


def main() -> int:
    planner.report(planner.run())
    print()
    applier.report(applier.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
