"""Taking a node over from kube-proxy's IPVS mode in place (``kipvs applier --adopt``), and handing it back
(``kipvs applier --hand-back``), without deleting and re-adding anything that carries traffic.

kube-proxy and kipvs write the same kernel objects under the same names: IPVS virtual services with
masquerade real servers, the VIPs on ``kube-ipvs0``, and the KUBE-* ipsets (``shared/plan/node_state.py``).
What differs is who filters and masquerades: kube-proxy with iptables chains that match those ipsets
(``pkg/proxy/ipvs/proxier.go``: ``iptablesJumpChain``, ``iptablesChains``, ``writeIptablesRules``), kipvs
with its nftables table ``inet kipvs``. So a takeover is:

1. adopt: every IPVS virtual service kube-proxy programmed that kipvs's plan also holds becomes kipvs's
   own: its key goes into the ownership sets (``KIPVS-OWNED-VS``/``KIPVS-6-OWNED-VS``, ``backend.py``)
   before the first write. The bootstrap's read-back + diff then writes only the differences (a weight,
   a missing real server); nothing is deleted and re-added, so IPVS's connection entries stay valid.
   A service the plan does not hold stays foreign: kipvs still never deletes a service not its own, and a
   service inside an excluded CIDR (``--ipvs-exclude-cidrs``) is never adopted;
2. kipvs's nftables table is installed (by the bootstrap) next to kube-proxy's chains; both mark 0x4000
   and masquerade, and a connection is NATed once (its conntrack entry keeps the first binding);
3. only then kube-proxy's iptables chains are unlinked, flushed and deleted, exactly as kube-proxy's own
   ``cleanupIptablesLeftovers`` does (``remove_kube_proxy_chains``). Established connections keep their
   conntrack NAT bindings; new ones are marked and masqueraded by kipvs's table. kube-proxy's ipsets are
   kipvs's own (same names, same types), so none is removed.

Handing back is the reverse, as kube-proxy adopts what it finds at its start (``syncService`` updates an
existing virtual service in place, ``syncEndpoint`` keeps existing real servers): kipvs's applier is
stopped, kube-proxy is started (it writes its chains over the same ipsets), then ``hand_back`` removes
kipvs's nftables table and its ownership sets, and leaves IPVS, ``kube-ipvs0`` and the KUBE-* ipsets as
they are.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
from typing import TYPE_CHECKING

from shared.plan.node_state import NodeState, VSKey, family_of

from .exclude import ExcludeCIDRs
from .kernel.backend import OWNED_SETS, Backend, Observed, owned_entry
from .node_facts import TAKEOVER_ALIAS
from .ops import AddEntry

if TYPE_CHECKING:
    from .kernel.netlink_writer import NetlinkKernel
    from .kernel.rules import NftRules

log = logging.getLogger("kipvs.applier")

# pkg/proxy/ipvs/proxier.go, iptablesJumpChain: (table, from, to, comment); kube-proxy links each with
# EnsureRule(Prepend, table, from, "-m", "comment", "--comment", comment, "-j", to).
KUBE_PROXY_JUMPS: tuple[tuple[str, str, str, str], ...] = (
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    ("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)
# proxier.go, iptablesCleanupChains (the same list as iptablesChains)
KUBE_PROXY_CHAINS: tuple[tuple[str, str], ...] = (
    ("nat", "KUBE-SERVICES"), ("nat", "KUBE-POSTROUTING"), ("nat", "KUBE-NODE-PORT"),
    ("nat", "KUBE-LOAD-BALANCER"), ("nat", "KUBE-MARK-MASQ"),
    ("filter", "KUBE-FORWARD"), ("filter", "KUBE-NODE-PORT"), ("filter", "KUBE-PROXY-FIREWALL"),
    ("filter", "KUBE-SOURCE-RANGES-FIREWALL"), ("filter", "KUBE-IPVS-FILTER"), ("filter", "KUBE-IPVS-OUT-FILTER"),
)
# kube-proxy's proxier per family (NewDualStackProxier), in whichever backend its image chose (iptables-wrapper
# picks the one holding rules): both are cleaned where the binaries exist, else plain iptables/ip6tables.
IPTABLES = ("iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy")
PLAIN_IPTABLES = ("iptables", "ip6tables")

NO_EXCLUDE = ExcludeCIDRs()


def adoption(desired: NodeState, observed: Observed, exclude: ExcludeCIDRs = NO_EXCLUDE) -> list[AddEntry]:
    """The ownership entries that make kube-proxy's virtual services kipvs's own: one per service that is
    in the kernel and in the plan, not owned yet and outside ``exclude`` (``--ipvs-exclude-cidrs``, parsed
    once by exclude.parse; kube-proxy's ``isIPInExcludeCIDRs``). Pure."""
    keys: list[VSKey] = sorted(key for key in desired.ipvs if key in observed.state.ipvs
                               and key not in observed.owned and not exclude.covers(key[1]))
    return [AddEntry(OWNED_SETS[family_of(key[1])], owned_entry(key)) for key in keys]


def foreign(desired: NodeState, observed: Observed) -> list[VSKey]:
    """Virtual services in the kernel that are neither kipvs's nor in its plan: left as they are."""
    return sorted(key for key in observed.state.ipvs if key not in desired.ipvs and key not in observed.owned)


def removal_commands(binary: str) -> list[list[str]]:
    """kube-proxy's ``cleanupIptablesLeftovers`` as commands: unlink, flush every chain, delete every chain
    (flushing all before deleting any removes the jumps between them first)."""
    unlink = [[binary, "-w", "5", "-t", table, "-D", chain, "-m", "comment", "--comment", comment, "-j", target]
              for table, chain, target, comment in KUBE_PROXY_JUMPS]
    flush = [[binary, "-w", "5", "-t", table, "-F", chain] for table, chain in KUBE_PROXY_CHAINS]
    delete = [[binary, "-w", "5", "-t", table, "-X", chain] for table, chain in KUBE_PROXY_CHAINS]
    return unlink + flush + delete


async def _run(argv: list[str], within: float = 30.0) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        return 124, f"{' '.join(argv)} did not finish within {within:.0f}s"
    return process.returncode or 0, err.decode(errors="replace").strip()[:500]


def _absent(message: str) -> bool:
    """iptables' words for a rule or chain that is not there (already removed, or never written)."""
    return any(word in message for word in ("does not exist", "No chain/target/match", "Bad rule",
                                            "No such file", "Couldn't load target", "doesn't exist",
                                            "can't initialize", "Table does not exist"))


async def remove_kube_proxy_chains() -> list[str]:
    """Remove kube-proxy's IPVS-mode iptables chains (both families); the chains removed, as
    ``table/chain`` lines. Idempotent: what is not there is skipped. A missing ``iptables`` binary or a
    refusal is logged and the chains are left: they match the same ipsets kipvs keeps up to date, so
    they forward correctly until removed by hand (``kube-proxy --cleanup`` must not be used: it flushes
    IPVS)."""
    removed: list[str] = []
    binaries = [b for b in IPTABLES if shutil.which(b)] or [b for b in PLAIN_IPTABLES if shutil.which(b)]
    if not binaries:
        log.warning("takeover: no iptables command here: kube-proxy's chains (if any) are left in place; they "
                    "match the ipsets kipvs keeps, so they stay correct")
    for binary in binaries:
        for argv in removal_commands(binary):
            code, err = await _run(argv)
            if code == 0 and argv[5] == "-X":
                removed.append(f"{binary} {argv[4]}/{argv[6]}")
            elif code != 0 and not _absent(err):
                log.warning("takeover: %s failed (%s); kube-proxy's chains are left in place", " ".join(argv), err)
                break
    if removed:
        log.info("takeover: removed kube-proxy's iptables chains after kipvs's nftables table took the traffic: %s",
                 ", ".join(removed))
    return removed


async def adopt(kernel: Backend, desired: NodeState, exclude: ExcludeCIDRs = NO_EXCLUDE) -> int:
    """Make the virtual services kube-proxy left that kipvs's plan holds kipvs's own (``adoption``), before
    the bootstrap's first write; the number adopted. Foreign ones are named in the log and left alone."""
    observed = await kernel.observe()
    entries = adoption(desired, observed, exclude)
    if entries:
        await kernel.apply(list(entries))
        # when, recorded on the link itself (node facts and `kipvs status` read it): it lasts as the link does
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await kernel.set_link_alias(TAKEOVER_ALIAS + when)
    left = foreign(desired, observed)
    log.info("takeover: adopted %d IPVS virtual services as they are (%d already kipvs's); %d not in kipvs's "
             "plan left alone%s", len(entries), len(observed.owned), len(left),
             f": {', '.join(f'{p} {ip}:{port}' for p, ip, port in left[:10])}" if left else "")
    return len(entries)


async def hand_back(kernel: NetlinkKernel, rules: NftRules | None) -> None:
    """Leave the node to kube-proxy in place: remove kipvs's nftables table and its ownership sets; IPVS,
    kube-ipvs0 and the KUBE-* ipsets stay as they are, for kube-proxy to adopt. Run it once kube-proxy
    runs again (its chains then mark and masquerade new connections)."""
    if rules is not None:
        await rules.remove()
    await kernel.forget_ownership()
    await kernel.set_link_alias("")  # kube-proxy's link again
