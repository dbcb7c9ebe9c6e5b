"""What is on the bus and where: the records (events), streams and subjects (topology), deltas in parts
(delta_chunks), the appliers' claims (node_claims)."""
