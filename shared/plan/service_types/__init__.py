"""What each kind of Service address programs on a node, one module per kind (kube-proxy IPVS parity):

- ``cluster_ip``: the ClusterIP virtual services, bound to kube-ipvs0;
- ``node_port``: one virtual service per node address and nodePort;
- ``external_ip``: spec.externalIPs, bound to kube-ipvs0 unless the node owns the address;
- ``load_balancer``: status.loadBalancer.ingress IPs (not ipMode Proxy), with source ranges.
"""
