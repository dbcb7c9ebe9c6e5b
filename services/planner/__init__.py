"""The planner (``kipvs planner``): the Kubernetes event log in, the plan's deltas out. ``core.py`` is pure
(``Planner``); ``active.py`` runs it on the log, ``publisher.py`` publishes exactly once, ``failover.py``,
``lease.py`` and ``fence.py`` keep one planner active; ``log_replay.py`` is the one replay, also run by
``kipvs plan`` (``plan.py``) and ``kipvs replay`` (``replay.py``)."""
