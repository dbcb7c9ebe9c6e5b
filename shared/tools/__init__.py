"""What the tools share: opening the log for a person, and a record on one line."""
