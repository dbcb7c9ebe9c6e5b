"""A real IPVS kernel on any Linux host: user-mode Linux (Debian's user-mode-linux), for the demo, the
kernel tests and the benchmarks.

The guest mounts the host's root read-only (hostfs), so the project and its virtual environment run
inside it unchanged. ``run_in_guest`` boots it, loads the modules kipvs needs, brings up loopback, runs
one command and returns its exit status and output (and hands each line to ``on_line`` as it comes, for
the demo's progress); the console is the only channel back.

What the Debian UML kernel (6.1) lacks, found here: nf_tables for ip/ip6/inet (only bridge), so kipvs's
nftables rules are tested on the host kernel in a network namespace instead (tests/test_rules.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (an editable install): the guest runs in it
WORK = Path(sys.prefix) / "uml"  # the virtual environment's: module links and init scripts
MODULES = (
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_mh", "dummy", "veth", "nf_conntrack",
    "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport", "ip_set_hash_ipportip", "ip_set_hash_ipportnet",
    "ip_set_bitmap_port", "bridge",
)
BEGIN, END = "=====KIPVS-GUEST-BEGIN=====", "=====KIPVS-GUEST-END====="


class GuestUnavailable(Exception):
    pass


@dataclass
class GuestRun:
    status: int
    output: str


def kernel() -> str:
    found = shutil.which("linux.uml") or ("/usr/bin/linux.uml" if Path("/usr/bin/linux.uml").exists() else None)
    if not found:
        raise GuestUnavailable("linux.uml not found: the kernel tests need Debian's user-mode-linux package "
                               "(make test installs it: apt-get install user-mode-linux)")
    return found


def module_root() -> Path:
    """modprobe -d root: <root>/lib/modules/<version> -> the UML package's modules (no host changes)."""
    versions = sorted(Path("/usr/lib/uml/modules").glob("*"))
    if not versions:
        raise GuestUnavailable("no modules in /usr/lib/uml/modules: reinstall user-mode-linux")
    root = WORK / "modroot"
    link = root / "lib" / "modules" / versions[-1].name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(versions[-1])
    return root


def unavailable_reason() -> str | None:
    """Why the guest cannot boot here (None: it can): checked before the demo commits to it."""
    try:
        kernel()
        module_root()
    except GuestUnavailable as exc:
        return str(exc)
    if not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK):
        return "/dev/shm is not writable: user-mode Linux keeps the guest's memory there"
    if os.geteuid() != 0:
        return "not root: the guest's network namespaces and IPVS need root inside it"
    return None


def run_in_guest(command: str, timeout: float = 600, memory: str = "1G",
                 on_line: Callable[[str], None] | None = None, tap: str | None = None) -> GuestRun:
    """Boot the guest, run ``command`` (sh) in it as root, power off. Output is what the command printed.
    With ``tap`` (a host tap device, see :class:`HostLink`), the guest's ``vec0`` is its other end."""
    linux = kernel()
    modroot = module_root()
    WORK.mkdir(parents=True, exist_ok=True)
    init = WORK / f"init-{uuid.uuid4().hex[:8]}.sh"
    init.write_text(f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs run /run
mkdir -p /run/tmp
export TMPDIR=/run/tmp HOME=/run/tmp PYTHONDONTWRITEBYTECODE=1
export PATH={Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin
echo 1 > /proc/sys/kernel/printk
for m in {' '.join(MODULES)}; do modprobe -d {modroot} $m || echo "kipvs-guest: cannot load $m"; done
ip link set lo up
cd {ROOT}
echo {BEGIN}
sh -c {_quote(command)} 2>&1
echo "{END} $?"
poweroff -f
""")
    init.chmod(0o755)
    argv = [linux, f"mem={memory}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro", f"init={init}",
            "con=null", "con0=fd:0,fd:1", "quiet", *([f"vec0:transport=tap,ifname={tap}"] if tap else [])]
    try:
        console = _console(argv, timeout, on_line)
    finally:
        init.unlink(missing_ok=True)
    match = re.search(re.escape(BEGIN) + r"\r?\n(.*)" + re.escape(END) + r" (\d+)", console, re.S)
    if not match:
        raise GuestUnavailable(f"the guest did not run the command; console:\n{console[-3000:]}")
    return GuestRun(int(match.group(2)), match.group(1).replace("\r\n", "\n"))


def _console(argv: list[str], timeout: float, on_line: Callable[[str], None] | None) -> str:
    """Run the guest and collect its console; lines between the markers go to ``on_line`` as they come."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TMPDIR": str(WORK)}, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        _kill_group(proc)

    killer = threading.Timer(timeout, kill)
    killer.start()
    lines, inside = [], False
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            if line.startswith(END):
                inside = False
            if inside and on_line is not None:
                on_line(line)
            if line == BEGIN:
                inside = True
        proc.wait()
    except BaseException:
        _kill_group(proc)  # Ctrl-C or an error on the host: the guest goes too (nothing left running)
        proc.wait()
        raise
    finally:
        killer.cancel()
    if timed_out.is_set():
        raise GuestUnavailable(f"the user-mode-Linux guest did not finish within {timeout}s")
    return "\n".join(lines) + "\n"


@dataclass
class HostLink:
    """A point-to-point link between this host and the guest (a tap device here, ``vec0`` there), so host
    tools can reach services in the guest. Only the two addresses below; nothing is routed beyond them."""

    name: str = "kipvs-demo0"
    host_address: str = "10.254.254.1"
    guest_address: str = "10.254.254.2"
    prefix: int = 30

    def create(self) -> str | None:
        """Make the tap device; None when done, else why it could not be."""
        steps = [["ip", "tuntap", "add", "dev", self.name, "mode", "tap"],
                 ["ip", "addr", "add", f"{self.host_address}/{self.prefix}", "dev", self.name],
                 ["ip", "link", "set", self.name, "up"]]
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                self.remove()
                return f"{' '.join(argv)}: {done.stderr.strip()}"
        return None

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.name], capture_output=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """UML runs as several host processes (one session): kill them all."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
