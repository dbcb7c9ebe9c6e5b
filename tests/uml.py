"""The user-mode-Linux guest the kernel tests and benchmarks boot (see kipvs.demo.guest)."""

from kipvs.demo.guest import GuestRun, GuestUnavailable, run_in_guest

__all__ = ["GuestRun", "GuestUnavailable", "run_in_guest"]
