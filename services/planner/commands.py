"""The planner's subcommands (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [
    ("planner", "services.planner.main", "consume the Kubernetes event log and publish plan deltas"),
    ("plan", "services.planner.plan", "replay watch events (a file) and print a node's desired state"),
    ("replay", "services.planner.replay", "re-run the planner over the log and diff against what was published"),
]
