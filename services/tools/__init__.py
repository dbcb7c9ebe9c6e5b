"""The SREs' tools over the log and the nodes: ``kipvs tap``, ``history``, ``why``, ``ipvs`` and ``status``
(``kipvs replay``, which re-runs the planner, lives with it: services/planner/replay.py)."""
