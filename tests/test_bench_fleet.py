"""The fleet benchmark's harness end to end at a tiny size (three real nats-servers, the simulator, the
watcher, the planner and two fleet sizes of real appliers), so that `make bench` cannot rot. Figures are not
checked against any goal here: only that each was measured."""

from __future__ import annotations

import math

import pytest

from tests.bench import fleet


def test_the_fleet_benchmark_runs_end_to_end(capsys) -> None:
    opt, _split = fleet.options(["--nodes", "1,3", "--services", "20", "--endpoints", "3", "--changes", "6",
                                 "--rate", "20"])
    rows = fleet.run(opt)
    fleet.report(opt, rows)
    assert [r["nodes"] for r in rows] == [1, 3]
    for r in rows:
        assert r["changes"] == 6, "every change must be traced to its delta and to every node's apply report"
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("p50_ms", "p99_ms", "servers_rss_mib",
                                                                "applier_rss_mib_per_node", "bootstrap_s"))
        assert r["messages_per_change"] >= 1.0
    assert "nodes   p50 ms" in capsys.readouterr().out


def test_bad_knobs_get_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        fleet.options(["--nodes", "1,x"])
    assert exit_.value.code == 2
    assert "--nodes: '1,x' is not a comma-separated list of numbers" in capsys.readouterr().err
