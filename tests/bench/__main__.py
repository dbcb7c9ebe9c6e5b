"""`make bench`: every benchmark, figures and ratios printed."""

from __future__ import annotations

import sys

from tests.bench import planner


def main() -> int:
    planner.report(planner.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
