"""The SREs' tools over the log: ``kipvs tap``, ``history``, ``why`` and ``replay``."""
