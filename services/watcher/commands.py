"""The watcher's subcommands (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [("watcher", "services.watcher.main", "list and watch the Kubernetes API into the event log")]
