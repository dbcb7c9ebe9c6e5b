"""What stands in for a cluster: the Kubernetes API simulator, the QEMU guest (a real kernel) and the demo. Tests
and ``kipvs demo`` run on them; no service imports them."""
