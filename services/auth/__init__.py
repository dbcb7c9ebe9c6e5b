"""The auth callout service: gives each node's applier its own identity on the bus."""
