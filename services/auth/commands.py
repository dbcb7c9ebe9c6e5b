"""The auth service's subcommand (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [("auth", "services.auth.main", "NATS auth callout: per-node applier identities from ServiceAccount tokens")]
