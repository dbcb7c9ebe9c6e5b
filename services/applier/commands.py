"""The applier's subcommands (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [("applier", "services.applier.main", "write this node's plan into the kernel (IPVS, kube-ipvs0, ipsets)")]
