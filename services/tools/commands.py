"""The audit tools' subcommands (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [
    ("tap", "services.tools.tap", "follow the log live, or from a time or sequence, filtered"),
    ("history", "services.tools.history", "every recorded change of one Kubernetes object and the deltas it caused"),
    ("why", "services.tools.why", "why a node forwards a VIP: the events, deltas and applies behind it"),
    ("ipvs", "services.tools.ipvs", "what a node's kernel holds (ipvsadm -Ln layout, --stats, --rate) and --diff "
                                 "against the plan"),
    ("status", "services.tools.status",
     "per node: the plan delta applied, how far behind, last report, drift, conflicts"),
]
