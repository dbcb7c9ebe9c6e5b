"""The IPVS service flags kipvs programs, shared by the applier (which writes them) and ``kipvs plan``'s
ipvsadm rendering (which prints them, so ``ipvsadm -R`` of the plan reproduces the kernel). Pure."""

from __future__ import annotations

PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
MH_PORT = 0x10  # IP_VS_SVC_F_SCHED_MH_PORT (= IP_VS_SVC_F_SCHED2): ipvsadm's "mh-port"
# ipvsadm.c print_sched_flags: IP_VS_SVC_F_SCHED1/2/3 named per scheduler
_SCHED_FLAG_NAMES = {"sh": ((0x8, "sh-fallback"), (0x10, "sh-port")),
                     "mh": ((0x8, "mh-fallback"), (0x10, "mh-port"))}
_GENERIC = ((0x8, "flag-1"), (0x10, "flag-2"), (0x20, "flag-3"))  # any other scheduler


def service_flags(scheduler: str, timeout: int) -> int:
    """IPVS_SVC_ATTR_FLAGS for a virtual service: persistent with ClientIP affinity; with the ``mh``
    scheduler always ``mh-port``, so the source port is hashed too and one client's connections spread over
    the real servers, as kube-proxy does (pkg/proxy/ipvs/proxier.go ``syncService``: ``if
    proxier.ipvsScheduler == "mh" { serv.Flags |= utilipvs.FlagSourceHash }``, 0x10; kubernetes#115526,
    PR 115527). Without it every connection of one client lands on one pod."""
    return (PERSISTENT if timeout else 0) | (MH_PORT if scheduler == "mh" else 0)


def sched_flag_names(scheduler: str, flags: int) -> list[str]:
    """The scheduler flags as ipvsadm names them (``-b``'s argument, ``ipvsadm -Ln``'s parentheses):
    ``("mh", 0x10)`` -> ``["mh-port"]``."""
    return [name for bit, name in _SCHED_FLAG_NAMES.get(scheduler, _GENERIC) if flags & bit]
