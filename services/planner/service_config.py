"""The planner service's settings (``kipvs planner`` flags, ``KIPVS_PLANNER_*`` variables, the config file)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from shared.service import config
from shared.service.config import describe

from . import parse
from .core import Planner, PlannerConfig
from .lease import LeaseTiming


class PlannerServiceConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    scheduler: Annotated[str, describe("cluster default IPVS scheduler (kube-proxy's --ipvs-scheduler)")] = "rr"
    batch: Annotated[int, describe("events fetched per batch"), msgspec.Meta(ge=1, le=10_000)] = 500
    snapshot_every: Annotated[int, describe("write a snapshot after this many deltas"), msgspec.Meta(ge=1)] = 2000
    snapshot_interval: Annotated[float, describe("...or after this many seconds with changes"),
                                 msgspec.Meta(gt=0)] = 30.0
    leader_elect: Annotated[bool, describe(
        "run as one of several planners: only the holder of the lease plans, the others stay warm "
        "(kube-controller-manager's --leader-elect; every planner of a cluster must have it)")] = False
    leader_elect_lease_duration: Annotated[float, describe(
        "seconds a standby waits after the lease's last renewal before taking it over"), msgspec.Meta(gt=0)] = 3.0
    leader_elect_renew_deadline: Annotated[float, describe(
        "seconds the active planner keeps planning without a successful renewal"), msgspec.Meta(gt=0)] = 2.0
    leader_elect_retry_period: Annotated[float, describe(
        "seconds between renewals, and between a standby's checks"), msgspec.Meta(gt=0)] = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lease_timing().check()
        if self.scheduler not in parse.SCHEDULERS:
            known = ", ".join(sorted(parse.SCHEDULERS))
            raise ValueError(f"scheduler {self.scheduler!r} is not an IPVS scheduler ({known})")

    def lease_timing(self) -> LeaseTiming:
        return LeaseTiming(self.leader_elect_lease_duration, self.leader_elect_renew_deadline,
                           self.leader_elect_retry_period)

    def new_planner(self) -> Planner:
        """An empty core with these settings."""
        return Planner(PlannerConfig(default_scheduler=self.scheduler))
