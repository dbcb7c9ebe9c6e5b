"""The read-only tools over the log and the node: ``kipvs tap``, ``history``, ``why``, ``ipvs`` and ``status``."""
