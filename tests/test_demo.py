"""``kipvs demo`` (what ``make demo`` runs), as a new user runs it: once with simulated kernels on this host,
once in the QEMU guest (Debian's kernel) with real IPVS and nftables. It must exit 0 on its own, show what
the issue lists, save its log for the tools, and leave nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from services.harness.demo.main import LOG_FILE
from services.harness.demo.run import kipvs_command

KIPVS = str(Path(sys.executable).with_name("kipvs"))


def _demo(*argv: str, timeout: float) -> str:
    LOG_FILE.unlink(missing_ok=True)
    done = subprocess.run([KIPVS, "demo", *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    return out


def _nothing_left(marker: str) -> None:
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                left.append(cmdline)
    assert not left, f"still running after the demo: {left}"


def _log_is_usable() -> None:
    assert LOG_FILE.exists(), "the demo saves its log"
    done = subprocess.run([KIPVS, "replay", "--log", str(LOG_FILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "identical" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([KIPVS, "why", "--log", str(LOG_FILE), "--node", "node-b", "10.96.0.10:80"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "node-b forwards TCP 10.96.0.10:80" in done.stdout


def test_the_demo_names_the_kipvs_its_reader_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    venv = tmp_path / "checkout" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "kipvs").write_text("#!/bin/sh\n")
    (venv / "kipvs").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.chdir(tmp_path / "checkout")
    assert kipvs_command() == ".venv/bin/kipvs"  # make demo in a checkout
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert kipvs_command() == str(venv / "kipvs")
    monkeypatch.setenv("PATH", str(venv))
    assert kipvs_command() == "kipvs"  # an installed kipvs on PATH
    (venv / "kipvs").unlink()
    monkeypatch.setenv("PATH", "/nonexistent")
    assert kipvs_command() == "kipvs"  # pip install --user: the command is elsewhere on PATH


def test_demo_with_simulated_kernels() -> None:
    before = set(Path(tempfile.gettempdir()).glob("kipvs-demo-*"))
    out = _demo("--backend", "memory", timeout=180)
    assert set(Path(tempfile.gettempdir()).glob("kipvs-demo-*")) == before, "a successful demo leaves no folder"
    assert "SIMULATED KERNELS" in out and "because: asked for with --backend memory" in out
    for step in range(1, 9):
        assert f"[{step}/8]" in out
    assert "from the Kubernetes change to the SIMULATED kernel" in out
    assert "node-a forwards TCP 10.96.0.10:80 for Service default/web" in out
    assert "(?)" not in out, "every pod with an endpoint mark is named (the applier's pod is host network)"
    assert "stopped: nothing of the demo is left running" in out
    _nothing_left("kipvs-demo-")
    _log_is_usable()


@pytest.mark.guest
def test_demo_in_the_guest_kept_running_and_explored_live_from_the_host() -> None:
    LOG_FILE.unlink(missing_ok=True)
    demo = subprocess.Popen([KIPVS, "demo", "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "Ctrl-C stops everything." in line:
                break
        out = "".join(lines)
        # The default backend (auto) must have found the guest: a silent fallback fails here.
        assert "SIMULATED" not in out and "booting a QEMU guest" in out, out[-3000:]
        assert "--- node-c: ipvsadm -Ln ---" in out and "Masq" in out
        assert "ClusterIP web 10.96.0.10:80 x6 -> web-1 on node-a: 3, web-2 on node-b: 3" in out
        assert "NodePort api 192.168.50.11:30080 x3 -> api-1 on node-c: 3" in out
        assert "ClusterIP session (ClientIP affinity) 10.96.0.40:80 x4 -> session-1 on node-b: 4" in out
        assert "ClusterIP web 10.96.0.10:80 x6 -> web-1 on node-a: 2, web-3 on node-c: 2, web-4 on node-b: 2" in out
        assert out.count("from the Kubernetes change to the kernel") == 2
        # Kept running: the tools on this host follow the guest's live log over the demo's link.
        url = "nats://10.254.254.2:4222"
        assert f"and on {url}, reachable from the host" in out
        # as the read-only tools identity, with the credentials the demo made on this host
        from services.harness.demo.main import demo_credentials

        creds = demo_credentials("10.254.254.2")
        why = subprocess.run([KIPVS, "why", "--nats-url", url, "--node", "node-c", "10.96.0.10:80",
                              "--nats-nkey-file", str(creds / "tools.nk"), "--nats-ca-file", str(creds / "ca.pem")],
                             capture_output=True, text=True, timeout=60)
        assert why.returncode == 0 and "web-3" not in why.stdout and "10.244.3.11:8080 weight 1" in why.stdout
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        rest = demo.communicate(timeout=180)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, rest[-3000:]
    assert "stopped: nothing of the demo is left running" in rest
    _nothing_left("kipvs-guest-demo-")  # the demo's guest (its share); not another test's guest on this machine
    assert subprocess.run(["ip", "link", "show", "kipvs-demo0"], capture_output=True).returncode != 0, \
        "the host end of the demo's link is gone"
    _log_is_usable()
