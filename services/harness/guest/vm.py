"""Boot Debian's kernel under QEMU, run one command in it as root, power off: the real IPVS + nf_tables
kernel of the demo, the kernel tests and the applier benchmark.

The guest sees the host's whole root read-only over virtio 9p, under a tmpfs overlay (so the checkout and its
virtual environment run inside it unchanged, and nothing it writes reaches the host), plus one small
read-write 9p share for the command and its exit status. It has no network card unless the demo asks for a
link from the host (``tap``); everything else stays inside its own network stack.

Accelerator: KVM only when it really works here (``/dev/kvm`` read-write, a CPU with vmx/svm, kvm_intel or
kvm_amd loaded and not the paravirtual kvm_pvm, under which a stock kernel dies), else TCG (software
emulation, ``-cpu max`` for the x86-64-v2+ instructions current wheels use). The command sees which one in
``KIPVS_GUEST_ACCEL`` and scales its time-outs by ``KIPVS_GUEST_TIME_SCALE`` (:func:`time_scale`).

Costs measured on a 2-core host under TCG: boot to power-off about 3 s; QEMU's resident memory about 0.4 GB
at ``-m 1G``. See docs/architecture.md ("A real kernel").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import image

ROOT = image.ROOT
BEGIN, END = "=====KIPVS-GUEST-BEGIN=====", "=====KIPVS-GUEST-END====="
QEMU = "qemu-system-x86_64"
# Time-outs inside the guest are written for a fast kernel; under emulation everything is this much slower.
TIME_SCALE = {"kvm": 1.0, "tcg": 3.0}
GUEST_NIC = "eth0"  # the guest's end of the host link (virtio-net)
# Where the guest mounts its read-write share with the host. Unlike the host's root (9p with cache=loose, so
# a file the host creates later may stay unseen), this share is uncached: a file the host writes into it
# while the command runs (a stop request) is seen at once.
SHARE_IN_GUEST = "/run/kipvs"


class GuestUnavailable(Exception):
    """The guest could not run the command: the message says why (missing QEMU, tools or image, a boot
    failure), never a silent fallback."""


class GuestTimeout(GuestUnavailable):
    """The command started in the guest but did not finish in time (not a reason to fall back)."""


@dataclass
class GuestRun:
    status: int
    output: str
    accelerator: str = "tcg"


def accelerator() -> str:
    """``kvm`` when KVM can run a stock kernel here, else ``tcg`` (see the module docstring)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
        return "tcg"
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists() or not ((modules / "kvm_intel").exists() or (modules / "kvm_amd").exists()):
        return "tcg"
    return "kvm"


def time_scale() -> float:
    """Inside the guest: the factor to stretch a time-out written for a fast kernel (1.0 outside)."""
    return float(os.environ.get("KIPVS_GUEST_TIME_SCALE", "1"))


# The guest runs this host's binaries (it sees its root): these must be here.
HOST_TOOLS = ("ip", "ipvsadm", "nft", "modprobe")


def unavailable_reason() -> str | None:
    """Why the guest cannot boot here (None: it can): checked before the demo commits to it."""
    if os.geteuid() != 0:
        return "not root: the 9p share of the host's root must let the guest's root read every file"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: install Debian's qemu-system-x86 (make guest does)"
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool, path=search) is None]
    if missing:
        return (f"{', '.join(missing)} not found on this host: the guest uses the host's tools (Debian's "
                "iproute2, ipvsadm, nftables, kmod; make guest installs them)")
    if image.ready_release() is None:
        return (f"no complete guest image in {image.cache_dir()}: run 'python -m services.harness.guest.image --dir "
                f"{image.cache_dir()}' (make guest does it for the default folder)")
    return None


def qemu_argv(memory: str, xfer: Path, tap: str | None, accel: str) -> list[str]:
    directory = image.cache_dir()
    acceleration = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    network = ["-netdev", f"tap,id=link,ifname={tap},script=no,downscript=no",
               "-device", "virtio-net-pci,netdev=link"] if tap else ["-nic", "none"]
    cmdline = "console=ttyS0 panic=-1 quiet loglevel=1"
    return [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-machine", "q35",
            *acceleration, "-smp", str(min(os.cpu_count() or 1, 2)), "-m", memory,
            "-kernel", str(directory / "vmlinux"), "-initrd", str(directory / "initramfs.gz"), "-append", cmdline,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={_qemu_value(xfer)},mount_tag=xfer,security_model=none",
            "-serial", "stdio", *network]


def run_in_guest(command: str, timeout: float = 600, memory: str = "1G",
                 on_line: Callable[[str], None] | None = None, tap: str | None = None,
                 share: Path | None = None) -> GuestRun:
    """Boot the guest, run ``command`` (sh, in the checkout, as root) in it, power off.

    Returns its exit status and everything it printed (stdout and stderr, in order); ``on_line`` gets each
    line as it comes. ``timeout`` (seconds, wall clock, boot included) kills the guest. With ``tap`` (a host
    tap device, see :class:`HostLink`), the guest's ``eth0`` is its other end. ``share`` (a folder of the
    caller's, default a temporary one) is the guest's SHARE_IN_GUEST, for files the caller writes while
    the command runs; the caller removes it.
    Raises GuestUnavailable when QEMU, the host tools or the image are missing or the guest did not boot;
    GuestTimeout when the command started but the time ran out.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise GuestUnavailable(reason)
    accel = accelerator()
    xfer = share or Path(tempfile.mkdtemp(prefix="kipvs-guest-"))
    token = uuid.uuid4().hex[:12]  # markers no command output can imitate by accident
    begin, end = f"{BEGIN}{token}", f"{END}{token}"
    try:
        (xfer / "command.sh").write_text(_command_script(command, accel, begin, end))
        # where init binds the modules from: a file, not the kernel command line (paths may hold spaces)
        (xfer / "moddir").write_text(str(image.cache_dir() / "root" / "lib" / "modules" / str(image.ready_release())))
        console = _console(qemu_argv(memory, xfer, tap, accel), timeout, on_line, begin, end)
        status_file = xfer / "status"
        match = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end) + r" (\d+)", console, re.S)
        if not match or not status_file.exists():
            raise GuestUnavailable("the guest did not run the command (is the image damaged? 'python -m "
                                   f"services.harness.guest.image --rebuild' makes it again); "
                                   f"console:\n{console[-3000:]}")
        return GuestRun(int(status_file.read_text().strip()), match.group(1), accel)
    finally:
        for name in ("command.sh", "status", "init-status", "moddir"):
            (xfer / name).unlink(missing_ok=True)
        if share is None:
            shutil.rmtree(xfer, ignore_errors=True)


def _command_script(command: str, accel: str, begin: str, end: str) -> str:
    venv_bin = Path(sys.executable).parent
    return f"""mkdir -p /run/tmp
export TMPDIR=/run/tmp HOME=/run/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export KIPVS_GUEST=1 KIPVS_GUEST_ACCEL={accel} KIPVS_GUEST_TIME_SCALE={TIME_SCALE[accel]}
export PATH={_quote(str(venv_bin))}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd {_quote(str(ROOT))}
echo {begin}
sh -c {_quote(command)} 2>&1 </dev/null
status=$?
printf '\\n%s %s\\n' {end} "$status"
echo "$status" > /run/kipvs/status
"""


def _qemu_value(path: Path) -> str:
    """A path inside a QEMU option list: commas are doubled (QEMU's escape)."""
    return str(path).replace(",", ",,")


def _console(argv: list[str], timeout: float, on_line: Callable[[str], None] | None, begin: str = BEGIN,
             end: str = END) -> str:
    """Run QEMU and collect the serial console; lines between the markers go to ``on_line`` as they come.
    QEMU's stdio is a pipe of our own (it sets O_NONBLOCK on it, which must not reach a caller's terminal)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
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
            line = raw.decode(errors="replace").rstrip("\r\n")  # the serial console's line ends only
            lines.append(line)
            if line.startswith(end):
                inside = False
            if inside and on_line is not None:
                on_line(line)
            if line == begin:
                inside = True
        proc.wait()
    except BaseException:
        _kill_group(proc)  # Ctrl-C or an error on the host: the guest goes too (nothing left running)
        proc.wait()
        raise
    finally:
        killer.cancel()
    if timed_out.is_set():
        started = any(line == begin for line in lines)
        error = GuestTimeout if started else GuestUnavailable
        raise error(f"the guest did not finish within {timeout:.0f}s; console tail:\n" + "\n".join(lines[-40:]))
    return "\n".join(lines) + "\n"


@dataclass
class HostLink:
    """A point-to-point link between this host and the guest (a tap device here, ``eth0`` there), so host
    tools can reach services in the guest. Only the two addresses below; nothing is routed beyond them.

    QEMU creates the tap device itself (not persistent), so it disappears with QEMU however QEMU ends,
    SIGKILL included; this side only checks the name is free before, and sets the host's address once
    the device appears."""

    name: str = "kipvs-demo0"
    host_address: str = "10.254.254.1"
    guest_address: str = "10.254.254.2"
    prefix: int = 30

    def _exists(self) -> bool:
        return Path("/sys/class/net", self.name).exists()

    def create(self) -> str | None:
        """Make sure the name is free; None when it is, else why not (another demo uses it). A device left
        by an old run (persistent, unused) is removed; one in use is never touched."""
        if self._exists():
            subprocess.run(["ip", "tuntap", "del", "dev", self.name, "mode", "tap"], capture_output=True)
            if self._exists():
                return f"{self.name} exists and is in use (another kipvs demo running?)"
        return None

    def configure_when_up(self, within: float = 120.0) -> threading.Thread:
        """In the background: once QEMU has made the device, give the host its address and bring it up."""
        def configure() -> None:
            deadline = time.monotonic() + within
            while not self._exists():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            subprocess.run(["ip", "addr", "add", f"{self.host_address}/{self.prefix}", "dev", self.name],
                           capture_output=True)
            subprocess.run(["ip", "link", "set", self.name, "up"], capture_output=True)

        thread = threading.Thread(target=configure, name="kipvs-host-link", daemon=True)
        thread.start()
        return thread

    def remove(self) -> None:
        """Nothing to do once QEMU has gone (its device went with it); a leftover persistent one goes."""
        if self._exists():
            subprocess.run(["ip", "tuntap", "del", "dev", self.name, "mode", "tap"], capture_output=True)


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills QEMU if this process dies, even by SIGKILL (no guest
    left running behind a killed demo or test run)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
