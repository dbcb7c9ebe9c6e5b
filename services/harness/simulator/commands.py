"""The simulator's subcommands (imported by ``kipvs`` at start: keep this module import-light)."""

COMMANDS = [("simulate", "services.harness.simulator.main",
             "run the Kubernetes API simulator, optionally with a scenario")]
