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
    """The guest could not run the command: the message says why (missing QEMU or image, boot failure,
    time-out), never a silent fallback."""


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


def unavailable_reason() -> str | None:
    """Why the guest cannot boot here (None: it can): checked before the demo commits to it."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: install Debian's qemu-system-x86 (make guest does)"
    if image.ready_release() is None:
        return f"no guest image in {image.cache_dir()}: run make guest (python -m kipvs.guest.image)"
    if os.geteuid() != 0:
        return "not root: the 9p share of the host's root must let the guest's root read every file"
    return None


def qemu_argv(memory: str, xfer: Path, tap: str | None, accel: str) -> list[str]:
    directory = image.cache_dir()
    release = image.ready_release(directory)
    moddir = directory / "root" / "lib" / "modules" / str(release)
    acceleration = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    network = ["-netdev", f"tap,id=link,ifname={tap},script=no,downscript=no",
               "-device", "virtio-net-pci,netdev=link"] if tap else ["-nic", "none"]
    cmdline = f"console=ttyS0 panic=-1 quiet loglevel=1 kipvs.moddir={moddir}"
    return [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-machine", "q35",
            *acceleration, "-smp", str(min(os.cpu_count() or 1, 2)), "-m", memory,
            "-kernel", str(directory / "vmlinux"), "-initrd", str(directory / "initramfs.gz"), "-append", cmdline,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={xfer},mount_tag=xfer,security_model=none",
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
    Raises GuestUnavailable when QEMU or the image is missing, the guest did not boot, or the time ran out.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise GuestUnavailable(reason)
    accel = accelerator()
    xfer = share or Path(tempfile.mkdtemp(prefix="kipvs-guest-"))
    try:
        (xfer / "command.sh").write_text(_command_script(command, accel))
        console = _console(qemu_argv(memory, xfer, tap, accel), timeout, on_line)
        status_file = xfer / "status"
        match = re.search(re.escape(BEGIN) + r"\n(.*)" + re.escape(END) + r" (\d+)", console, re.S)
        if not match or not status_file.exists():
            raise GuestUnavailable(f"the guest did not run the command; console:\n{console[-3000:]}")
        return GuestRun(int(status_file.read_text().strip()), match.group(1), accel)
    finally:
        for name in ("command.sh", "status", "init-status"):
            (xfer / name).unlink(missing_ok=True)
        if share is None:
            shutil.rmtree(xfer, ignore_errors=True)


def _command_script(command: str, accel: str) -> str:
    venv_bin = Path(sys.executable).parent
    return f"""mkdir -p /run/tmp
export TMPDIR=/run/tmp HOME=/run/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export KIPVS_GUEST=1 KIPVS_GUEST_ACCEL={accel} KIPVS_GUEST_TIME_SCALE={TIME_SCALE[accel]}
export PATH={venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd {ROOT}
echo {BEGIN}
sh -c {_quote(command)} 2>&1 </dev/null
status=$?
echo "{END} $status"
echo "$status" > /run/kipvs/status
"""


def _console(argv: list[str], timeout: float, on_line: Callable[[str], None] | None) -> str:
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
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
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
        raise GuestUnavailable(f"the guest did not finish within {timeout:.0f}s; console tail:\n"
                               + "\n".join(lines[-40:]))
    return "\n".join(lines) + "\n"


@dataclass
class HostLink:
    """A point-to-point link between this host and the guest (a tap device here, ``eth0`` there), so host
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
