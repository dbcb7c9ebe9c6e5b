"""The plan model both sides of the bus share: the shared plan as a consumer holds it (``plan_state``),
per-node resolution of it into a node's kernel state (``resolve``, with ``endpoints`` choosing each node's
endpoints and ``service_types`` saying what each kind of Service address programs), and that state
(``node_state``). Pure: the planner, ``kipvs plan`` and the applier all resolve a node through here, so a
node's state is never computed two ways, and the applier depends on ``shared`` alone."""
