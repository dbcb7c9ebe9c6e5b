"""The demo's subcommand (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [
    ("demo", "services.harness.demo.main", "run the whole system on this machine and show it working (make demo)"),
]
