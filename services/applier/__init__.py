"""The applier (``kipvs applier``), on every node: the plan's deltas for this node in, the kernel written.
``core.py`` is pure (deltas + node state -> kernel operations), ``shell.py`` runs a batch through it, the
kernel adapter (``kernel/``) and one manager per concern after a write (``conntrack``, ``reports``,
``marks``, ``drift``, ``health_check``, ``node_settings``, ``node_facts``); ``main.py`` wires and runs."""
