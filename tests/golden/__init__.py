"""Golden replay files. Regenerate (only when a planner change is meant to change its output) with
``.venv/bin/python -m tests.golden.regenerate`` and review the diff like code."""
