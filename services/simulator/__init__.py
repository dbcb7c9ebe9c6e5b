"""kipvs."""
