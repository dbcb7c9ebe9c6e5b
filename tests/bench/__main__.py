"""`make bench`: every benchmark, figures and ratios printed (never asserted).

``python -m tests.bench fleet --help``: the fleet benchmark alone, with its knobs (issue 17);
``python -m tests.bench envelope --help``: the node-envelope benchmark alone (issue 22)."""

from __future__ import annotations

import sys

from tests.bench import applier, envelope, fleet, planner


def main(argv: list[str]) -> int:
    if argv[:1] == ["fleet"]:
        return fleet.main(argv[1:])
    if argv[:1] == ["envelope"]:
        return envelope.main(argv[1:])
    if argv:
        print(f"usage: python -m tests.bench [fleet|envelope [--help]]; unknown {argv[0]!r}", file=sys.stderr)
        return 2
    planner.report(planner.run())
    print()
    applier.report(applier.run())
    print()
    fleet.main([])
    print()
    envelope.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
