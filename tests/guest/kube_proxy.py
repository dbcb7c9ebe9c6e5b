"""kube-proxy's IPVS mode, as it writes a node's kernel (no kube-proxy binary exists here): for the
connection-disruption tests, inside the QEMU guest, in a node's network namespace.

Followed from kubernetes ``pkg/proxy/ipvs/proxier.go`` (NewProxier's sysctls; syncProxyRules: the virtual
services, masquerade real servers at weight 1, the VIPs on the dummy link kube-ipvs0, left down; the
ipsets of ``ipsetInfo`` created by ``pkg/proxy/ipvs/ipset`` as ``ipset create NAME TYPE family inet hashsize
1024 maxelem 65536 comment`` (bitmaps: ``range 0-65535 comment``); ``createAndLinkKubeChain``: the chains
of ``iptablesChains`` and the jumps of ``iptablesJumpChain``, prepended; ``writeIptablesRules``: the rules
over those ipsets, restored with ``iptables-restore --noflush``) and ``cleanupLeftovers`` for
``kube-proxy --cleanup``. Single-stack IPv4 with ``--cluster-cidr`` (the local traffic detector by CIDR),
no ``--masquerade-all``; the masquerade bit 14 (0x4000).
"""

from __future__ import annotations

import subprocess

from services.applier.takeover import KUBE_PROXY_CHAINS, KUBE_PROXY_JUMPS
from shared.plan.node_state import IPSET_TYPES, NodeState

MARK = f"{0x4000:#08x}"  # fmt.Sprintf("%#08x", 1 << masqueradeBit)
SYSCTLS = {"net.ipv4.vs.conntrack": "1", "net.ipv4.vs.expire_nodest_conn": "1",
           "net.ipv4.vs.expire_quiescent_template": "1", "net.ipv4.ip_forward": "1"}
# pkg/proxy/ipvs/ipset.go: the comments kube-proxy gives its sets (and the rules that match them)
COMMENTS = {
    "KUBE-LOOP-BACK": "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    "KUBE-CLUSTER-IP": "Kubernetes service cluster ip + port for masquerade purpose",
    "KUBE-LOAD-BALANCER": "Kubernetes service lb portal",
    "KUBE-LOAD-BALANCER-LOCAL": "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    "KUBE-NODE-PORT-TCP": "Kubernetes nodeport TCP port for masquerade purpose",
    "KUBE-NODE-PORT-LOCAL-TCP": "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    "KUBE-NODE-PORT-UDP": "Kubernetes nodeport UDP port for masquerade purpose",
    "KUBE-NODE-PORT-LOCAL-UDP": "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    "KUBE-LOAD-BALANCER-FW": "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": "Kubernetes service load balancer ip + port + source cidr for packet filter "
                                      "purpose",
    "KUBE-LOAD-BALANCER-SOURCE-IP": "Kubernetes service load balancer ip + port + source IP for packet filter "
                                    "purpose to deal with hairpin",
    "KUBE-HEALTH-CHECK-NODE-PORT": "Kubernetes health check node port",
    "KUBE-IPVS-IPS": "Kubernetes service IP list",
}
# proxier.go, ipsetWithIptablesChain: (set, table, from, to, match, protocol), in its order
SET_RULES = (
    ("KUBE-LOOP-BACK", "nat", "KUBE-POSTROUTING", "MASQUERADE", "dst,dst,src", ""),
    ("KUBE-LOAD-BALANCER", "nat", "KUBE-SERVICES", "KUBE-LOAD-BALANCER", "dst,dst", ""),
    ("KUBE-LOAD-BALANCER-LOCAL", "nat", "KUBE-LOAD-BALANCER", "RETURN", "dst,dst", ""),
    ("KUBE-NODE-PORT-LOCAL-TCP", "nat", "KUBE-NODE-PORT", "RETURN", "dst", "tcp"),
    ("KUBE-NODE-PORT-TCP", "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "tcp"),
    ("KUBE-NODE-PORT-LOCAL-UDP", "nat", "KUBE-NODE-PORT", "RETURN", "dst", "udp"),
    ("KUBE-NODE-PORT-UDP", "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "udp"),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "nat", "KUBE-NODE-PORT", "RETURN", "dst,dst", "sctp"),
    ("KUBE-NODE-PORT-SCTP-HASH", "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst,dst", "sctp"),
    ("KUBE-LOAD-BALANCER-FW", "filter", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL", "dst,dst", ""),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
)


def _comment(name: str) -> str:
    return COMMENTS.get(name, f"Kubernetes {name}")


def iptables_restore(state: NodeState, cluster_cidr: str) -> str:
    """writeIptablesRules' output for ``state``'s ipsets (a rule over a set only when the set has entries)."""
    nonempty = {name for name in IPSET_TYPES if state.ipsets.get(name)}
    nat = [f":{chain} - [0:0]" for table, chain in KUBE_PROXY_CHAINS if table == "nat"]
    filt = [f":{chain} - [0:0]" for table, chain in KUBE_PROXY_CHAINS if table == "filter"]
    nat.append("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN")
    for name, table, source, target, match, protocol in SET_RULES:
        if name in nonempty:
            proto = f"-p {protocol} " if protocol else ""
            rule = (f'-A {source} {proto}-m comment --comment "{_comment(name)}" -m set --match-set {name} {match} '
                    f"-j {target}")
            (nat if table == "nat" else filt).append(rule)
    if "KUBE-CLUSTER-IP" in nonempty:
        nat.append(f'-A KUBE-SERVICES -m comment --comment "{_comment("KUBE-CLUSTER-IP")}" -m set --match-set '
                   f"KUBE-CLUSTER-IP dst,dst ! -s {cluster_cidr} -j KUBE-MARK-MASQ")
    nat.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    nat.append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    filt.append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    for name in ("KUBE-CLUSTER-IP", "KUBE-LOAD-BALANCER"):  # acceptIPVSTraffic
        if name in nonempty:
            nat.append(f"-A KUBE-SERVICES -m set --match-set {name} dst,dst -j ACCEPT")
    filt += [f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MARK}/{MARK} '
             "-j ACCEPT",
             '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate '
             "RELATED,ESTABLISHED -j ACCEPT",
             f'-A KUBE-NODE-PORT -m comment --comment "{_comment("KUBE-HEALTH-CHECK-NODE-PORT")}" -m set '
             "--match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT"]
    for name in ("KUBE-LOAD-BALANCER", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL"):
        filt.append(f"-A KUBE-IPVS-FILTER -m set --match-set {name} dst,dst -j RETURN")
    filt += ["-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
             "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"]
    nat += [f"-A KUBE-POSTROUTING -m mark ! --mark {MARK}/{MARK} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {MARK}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
            "--random-fully",
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {MARK}"]
    return "\n".join(["*nat", *nat, "COMMIT", "*filter", *filt, "COMMIT", ""])


def run(netns: str, *argv: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True,
                          timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in {netns}: {done.stderr.strip() or done.returncode}")
    return done


def write_ipvs(netns: str, state: NodeState) -> None:
    """Virtual services, real servers, kube-ipvs0 and its VIPs, added to whatever is there (a kube-proxy
    restart finds its own table and adds only what is missing)."""
    existing = run(netns, "ipvsadm", "-S", "-n").stdout
    rules = []
    for vs in state.ipvs.values():
        flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[vs.protocol]
        if f"-A {flag} {vs.ip}:{vs.port} " not in existing:
            rules.append(f"-A {flag} {vs.ip}:{vs.port} -s {vs.scheduler}"
                         + (f" -p {vs.persistence_timeout}" if vs.persistence_timeout else ""))
            rules += [f"-a {flag} {vs.ip}:{vs.port} -r {ip}:{port} -m -w 1" for (ip, port) in vs.reals]
    if rules:
        run(netns, "ipvsadm", "-R", stdin="\n".join(rules) + "\n")
    if run(netns, "ip", "link", "show", "kube-ipvs0", check=False).returncode != 0:
        run(netns, "ip", "link", "add", "kube-ipvs0", "type", "dummy")
    for ip in sorted(state.addresses):
        run(netns, "ip", "addr", "replace", f"{ip}/32", "dev", "kube-ipvs0")


def write_ipsets(netns: str, state: NodeState) -> None:
    for name, kind in IPSET_TYPES.items():
        options = ["range", "0-65535"] if kind == "bitmap:port" else ["family", "inet", "hashsize", "1024",
                                                                       "maxelem", "65536"]
        run(netns, "ipset", "create", name, kind, *options, "comment", "-exist")
        for entry in sorted(state.ipsets.get(name, ())):
            run(netns, "ipset", "add", name, entry, "-exist")


def write_iptables(netns: str, state: NodeState, cluster_cidr: str) -> None:
    run(netns, "iptables-restore", "--noflush", stdin=iptables_restore(state, cluster_cidr))
    for table, source, target, comment in KUBE_PROXY_JUMPS:  # EnsureRule(Prepend, ...)
        rule = ["-m", "comment", "--comment", comment, "-j", target]
        if run(netns, "iptables", "-t", table, "-C", source, *rule, check=False).returncode != 0:
            run(netns, "iptables", "-t", table, "-I", source, *rule)


def start(netns: str, state: NodeState, cluster_cidr: str) -> None:
    """What kube-proxy's IPVS mode holds on the node once it has synced ``state``."""
    write_ipvs(netns, state)  # first: loading ip_vs makes its sysctls
    for key, value in SYSCTLS.items():
        run(netns, "sysctl", "-qw", f"{key}={value}")
    write_ipsets(netns, state)
    write_iptables(netns, state, cluster_cidr)


def cleanup(netns: str) -> None:
    """``kube-proxy --cleanup`` (cleanupLeftovers): IPVS flushed, kube-ipvs0 deleted, chains, ipsets."""
    run(netns, "ipvsadm", "-C")
    run(netns, "ip", "link", "del", "kube-ipvs0", check=False)
    for table, source, target, comment in KUBE_PROXY_JUMPS:
        run(netns, "iptables", "-t", table, "-D", source, "-m", "comment", "--comment", comment, "-j", target,
            check=False)
    for table, chain in KUBE_PROXY_CHAINS:
        run(netns, "iptables", "-t", table, "-F", chain, check=False)
    for table, chain in KUBE_PROXY_CHAINS:
        run(netns, "iptables", "-t", table, "-X", chain, check=False)
    for name in IPSET_TYPES:
        run(netns, "ipset", "destroy", name, check=False)


def chains(netns: str) -> list[str]:
    """kube-proxy's chains in the node's iptables (both tables), as ``table/chain``."""
    found = []
    for table in ("nat", "filter"):
        out = run(netns, "iptables", "-t", table, "-S").stdout
        found += [f"{table}/{line.split()[1]}" for line in out.splitlines()
                  if line.startswith("-N KUBE-")]
    return found
