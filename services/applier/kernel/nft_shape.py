"""The shape of kipvs's nftables table, read over nfnetlink: its chains and rules as the kernel holds them,
without what changes in normal operation.

The drift check holds the table to the shape it had right after kipvs last wrote it: a chain flushed, a
rule added, changed or deleted by another program is drift (kube-proxy repairs its iptables chains the
same way, by rewriting them at every sync). Two dumps, ``NFT_MSG_GETCHAIN`` and ``NFT_MSG_GETRULE``
(``nf_tables_dump_chains`` / ``nf_tables_dump_rules`` in net/netfilter/nf_tables_api.c), whose size does
not grow with the node's Services: set members are not part of a rule (a rule names its set), so a node
of 10,000 Services costs what one of 10 does, and no ``nft`` process runs.

Left out: chain and rule handles, a chain's use count and counters and a rule's position (they change
when the same table is written again). Calico's per-mark chains ``em_*`` are in: kipvs notes the shape
again after adding or removing one (``NftRules.set_endpoint_marks``). Set and map members are compared
apart (``NftRules.listed``).
"""

from __future__ import annotations

import hashlib
import struct

from .kernel_decode import NFNL_SUBSYS_NFTABLES, attrs
from .netlink_batch import attr
from .netlink_dump import DumpSocket

NFT_MSG_GETCHAIN, NFT_MSG_GETRULE = 4, 7
NFPROTO_INET = 1
NFTA_TABLE_NAME = 1  # NFTA_CHAIN_TABLE and NFTA_RULE_TABLE alike
NFTA_CHAIN_HANDLE, NFTA_CHAIN_USE, NFTA_CHAIN_COUNTERS = 2, 6, 8
NFTA_RULE_HANDLE, NFTA_RULE_POSITION = 3, 6
_CHAIN_VOLATILE = frozenset({NFTA_CHAIN_HANDLE, NFTA_CHAIN_USE, NFTA_CHAIN_COUNTERS})
_RULE_VOLATILE = frozenset({NFTA_RULE_HANDLE, NFTA_RULE_POSITION})


def request(message: int, table: str) -> tuple[int, bytes]:
    """(netlink message type, payload) of a dump of ``message`` (GETCHAIN, GETRULE) for the inet ``table``
    (the kernel filters rules by table; chains are filtered by :func:`shape`)."""
    body = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attr(NFTA_TABLE_NAME, table.encode() + b"\0")
    return (NFNL_SUBSYS_NFTABLES << 8) | message, body


def shape(chains: list[bytes], rules: list[bytes], table: str) -> str:
    """A digest (hex) of the chains and rules of ``table`` in the dumps' payloads (after the netlink
    header), in the kernel's order, without the volatile attributes. DecodeError when a reply is
    malformed."""
    name = table.encode() + b"\0"
    digest = hashlib.sha256()
    for kind, payloads, volatile in ((b"C", chains, _CHAIN_VOLATILE), (b"R", rules, _RULE_VOLATILE)):
        for payload in payloads:
            found = attrs(payload, 4)
            if found.get(NFTA_TABLE_NAME) != name:
                continue
            digest.update(kind)
            for key, value in found.items():
                if key not in volatile:
                    digest.update(struct.pack("=HI", key, len(value)) + value)
    return digest.hexdigest()


async def read(sock: DumpSocket, table: str) -> str:
    """:func:`shape` of the table as the kernel holds it now (two dumps on ``sock``, an nfnetlink socket).
    DumpError (an OSError) when the kernel refuses a dump."""
    chains = await sock.dump(*request(NFT_MSG_GETCHAIN, table))
    rules = await sock.dump(*request(NFT_MSG_GETRULE, table))
    return shape(chains, rules, table)
