"""``kipvs demo``: the whole system on one machine (a QEMU guest with Debian's kernel for real IPVS), and the cluster
harness the end-to-end tests share with it."""
