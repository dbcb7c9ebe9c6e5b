"""The audit tools' subcommands (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [
    ("tap", "kipvs.audit.tap", "follow the log live, or from a time or sequence, filtered"),
    ("history", "kipvs.audit.history", "every recorded change of one Kubernetes object and the deltas it caused"),
    ("why", "kipvs.audit.why", "why a node forwards a VIP: the events, deltas and applies behind it"),
    ("ipvs", "kipvs.audit.ipvs", "what a node's kernel holds (ipvsadm -Ln layout, --stats, --rate) and --diff "
                                 "against the plan"),
    ("status", "kipvs.audit.status", "per node: the plan delta applied, how far behind, last report, drift, conflicts"),
]
