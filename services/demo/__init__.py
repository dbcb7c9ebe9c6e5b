"""``kipvs demo``: the whole system on one machine (user-mode Linux for real IPVS kernels), and the cluster
harness the end-to-end tests share with it."""
