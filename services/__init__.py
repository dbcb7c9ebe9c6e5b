"""What runs: the services (watcher, planner, applier, auth), the read-only tools and the harnesses."""
