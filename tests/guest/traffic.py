"""Traffic for the connection-disruption tests (run as a script inside the QEMU guest), in the style of
Cilium's connection-disruption checks: what a proxy switch must not break, counted.

    python traffic.py serve NETNS...    a TCP echo server on ports 9000-9002 in each pod namespace; prints "ready"
    python traffic.py load --long H:P ... --new H:P ... --udp H:P ...
        --long: two long-lived TCP connections per target, a 64-byte message echoed every 100 ms; a
                connection reset or closed is a *reset*, an echo later than the stall bound a *stall*
                (either ends that connection's count: it is lost)
        --new:  a new TCP connection to each target every 200 ms (connect, echo, close); any failure counts
        --udp:  a datagram to each target every 200 ms from one socket per target (a long-lived flow);
                no answer within the bound is a lost datagram
        --evidence DIR NODE POD...: on a stall or reset, what the node's kernel holds for that connection
                (its conntrack entries, IPVS connection entries, rules, the sockets at both ends) is
                written to DIR/<pid>-<n>.txt (the first three), for the test to print
    It prints "ready" once every long-lived connection is up, runs until a line "stop" (or EOF) on stdin,
    then prints one JSON object: the counts, the first failures described, the slowest echo.
    A line "lap" prints that object for the run since the last lap and counts again from zero, the traffic
    going on: one process measures several moments in turn (a long-lived connection lost in one lap is
    gone from the next; long_lived counts those alive when the lap began).
    A line "mark" on stdin (answered "marked") splits the run: only what fails in an attempt begun at or
    after the mark counts (resets, stalls, new_failed, udp_lost); earlier attempts' failures are counted
    apart (failed_before_mark), and new_ok_after_mark / udp_ok_after_mark say traffic flowed after it. For a
    moment in which loss is expected until a point (a reboot: until the node is programmed again).
    python traffic.py shared-port NODE A B   a connection to A from a fixed source port, then one to B from
                the same port on the same pod, then an echo on the first; prints one JSON object: whether
                it echoed within the stall bound

Bounds scale with KIPVS_GUEST_TIME_SCALE (3 under emulation): a stall is an echo slower than 3 s x scale,
which no healthy path comes near, and which a deleted virtual service or a lost NAT binding always passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ECHO_PORTS = (9000, 9001, 9002)  # one per Service under test: no two Services share a real server
SCALE = float(os.environ.get("KIPVS_GUEST_TIME_SCALE", "1"))
STALL_S = 3.0 * SCALE
UDP_WAIT_S = 1.0 * SCALE
PERIOD_S = 0.2


def _clock() -> str:
    """Wall-clock time, UTC, as the services' JSON logs write it: to line a failure up with their logs."""
    now = time.time()
    return time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Counts:
    def __init__(self) -> None:
        self.long = 0
        self.echoes = 0
        # failures as (when the attempt began, monotonic s; what failed)
        self.resets: list[tuple[float, str]] = []
        self.stalls: list[tuple[float, str]] = []
        self.new_ok = 0
        self.new_failed: list[tuple[float, str]] = []
        self.udp_ok = 0
        self.udp_lost: list[tuple[float, str]] = []
        self.slowest_echo_ms = 0.0
        self.started = time.monotonic()
        self.evidence: Evidence | None = None
        self.mark: float | None = None  # monotonic time of the "mark" line, if one came
        self.ok_after_mark = {"new": 0, "udp": 0}

    def at(self) -> str:
        return f"{time.monotonic() - self.started:.1f}s"

    @staticmethod
    def fail(kind: list[tuple[float, str]], began: float, text: str) -> None:
        """Count a failure of an attempt begun at ``began`` (monotonic s): classified by the mark at the end,
        as the mark may come while the attempt still runs."""
        kind.append((began, text))

    def ok(self, kind: str, began: float) -> None:
        if self.mark is not None and began >= self.mark:
            self.ok_after_mark[kind] += 1

    def _counted(self, kind: list[tuple[float, str]]) -> tuple[list[str], list[str]]:
        """(failures that count, failures of attempts begun before the mark)."""
        mark = self.mark if self.mark is not None else float("-inf")
        return [t for began, t in kind if began >= mark], [t for began, t in kind if began < mark]

    def lap(self) -> dict:
        """The result so far, then every count from zero (``long`` less the connections lost)."""
        out = self.result()
        self.long -= len(self.resets) + len(self.stalls)
        self.echoes = self.new_ok = self.udp_ok = 0
        self.resets, self.stalls, self.new_failed, self.udp_lost = [], [], [], []
        self.slowest_echo_ms = 0.0
        self.mark = None
        self.ok_after_mark = {"new": 0, "udp": 0}
        if self.evidence is not None:
            self.evidence.files = []
        return out

    def result(self) -> dict:
        (resets, r0), (stalls, s0), (new_failed, n0), (udp_lost, u0) = map(
            self._counted, (self.resets, self.stalls, self.new_failed, self.udp_lost))
        out = {"long_lived": self.long, "echoes": self.echoes, "resets": len(resets),
               "stalls": len(stalls), "new_ok": self.new_ok, "new_failed": len(new_failed),
               "udp_ok": self.udp_ok, "udp_lost": len(udp_lost),
               "slowest_echo_ms": round(self.slowest_echo_ms, 1),
               "first_failures": (resets + stalls + new_failed + udp_lost)[:12],
               "evidence": self.evidence.files if self.evidence is not None else []}
        if self.mark is not None:
            out |= {"failed_before_mark": len(r0 + s0 + n0 + u0), "new_ok_after_mark": self.ok_after_mark["new"],
                    "udp_ok_after_mark": self.ok_after_mark["udp"]}
        return out


class Evidence:
    """What the kernel holds for a failed long-lived connection, captured when it fails (a stall is seen
    STALL_S after its last echo; the state that stalls it is still there)."""

    def __init__(self, folder: str, node: str, pods: list[str]) -> None:
        self.folder, self.node, self.pods = Path(folder), node, pods
        self.n = 0
        self.files: list[str] = []

    def _run(self, *argv: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30 * SCALE)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"$ {' '.join(argv)}: {exc}\n"
        return f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}"

    def _grep(self, text: str, *words: str) -> str:
        lines = text.splitlines()
        return "\n".join(lines[:1] + [line for line in lines[1:] if any(w in line for w in words)]) + "\n"

    def capture(self, what: str, local: tuple[str, int], remote: tuple[str, int]) -> str:
        """Write the evidence file; its path."""
        self.n += 1
        node = ("ip", "netns", "exec", self.node)
        port = str(local[1])
        parts = [f"{_clock()} {what}: {local[0]}:{port} -> {remote[0]}:{remote[1]}\n",
                 self._run("ss", "-tnioe", "sport", "=", f":{port}"),
                 self._grep(self._run(*node, "cat", "/proc/net/nf_conntrack"), f"sport={port} ", f"dport={port} "),
                 self._grep(self._run(*node, "ipvsadm", "-Lnc"), f":{port} "),
                 self._run(*node, "ipvsadm", "-Ln", "--stats"),
                 self._run(*node, "ipvsadm", "-Ln"),
                 *(self._grep(self._run("ip", "netns", "exec", pod, "ss", "-tnie", "state", "established"),
                              *(f":{p} " for p in ECHO_PORTS)) for pod in self.pods),
                 self._run(*node, "nft", "list", "ruleset"),
                 self._run(*node, "ip", "-s", "link"),
                 self._run(*node, "ip", "addr")]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{os.getpid()}-{self.n}.txt"
        path.write_text("\n".join(parts))
        self.files.append(str(path))
        return str(path)


async def _capture(counts: Counts, what: str, writer: asyncio.StreamWriter) -> None:
    if counts.evidence is not None and len(counts.evidence.files) < 3:  # the first few tell; more slow the stop
        sock = writer.get_extra_info("socket")
        local, remote = sock.getsockname(), sock.getpeername()
        await asyncio.get_running_loop().run_in_executor(None, counts.evidence.capture, what, local, remote)


async def long_lived(target: tuple[str, int], counts: Counts, stop: asyncio.Event, up: asyncio.Event) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), STALL_S)
    counts.long += 1
    up.set()
    n = 0
    last_echo = _clock()
    try:
        while not stop.is_set():
            message = f"{n:063d}\n".encode()
            began = time.monotonic()
            writer.write(message)
            try:
                echoed = await asyncio.wait_for(reader.readexactly(len(message)), STALL_S)
            except TimeoutError:
                port = writer.get_extra_info("sockname")[1]
                counts.fail(counts.stalls, began, f"{counts.at()} long-lived {target[0]}:{target[1]} stalled "
                                     f"(no echo in {STALL_S}s; from port {port}, last echo at {last_echo} UTC)")
                await _capture(counts, f"stall after the echo at {last_echo}", writer)
                return
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                counts.fail(counts.resets, began,
                            f"{counts.at()} long-lived {target[0]}:{target[1]} reset ({type(exc).__name__})")
                with contextlib.suppress(OSError):
                    await _capture(counts, f"reset ({type(exc).__name__}) after the echo at {last_echo}", writer)
                return
            if echoed != message:
                counts.fail(counts.resets, began, f"{counts.at()} long-lived {target[0]}:{target[1]} got other bytes")
                return
            counts.echoes += 1
            last_echo = _clock()
            counts.slowest_echo_ms = max(counts.slowest_echo_ms, (time.monotonic() - began) * 1000)
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    finally:
        writer.close()


async def one_connection(target: tuple[str, int], counts: Counts) -> None:
    began = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), STALL_S)
        try:
            writer.write(b"hello, new connection\n")
            line = await asyncio.wait_for(reader.readline(), STALL_S)
        finally:
            writer.close()
        if line != b"hello, new connection\n":
            raise ConnectionError(f"echoed {line!r}")
        counts.new_ok += 1
        counts.ok("new", began)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        counts.fail(counts.new_failed, began, f"{counts.at()} new connection to {target[0]}:{target[1]} failed "
                                 f"({type(exc).__name__} {exc})")


async def new_connections(target: tuple[str, int], counts: Counts, stop: asyncio.Event) -> None:
    tasks = set()
    while not stop.is_set():
        task = asyncio.create_task(one_connection(target, counts))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PERIOD_S)
    if tasks:
        await asyncio.gather(*tasks)


async def datagrams(target: tuple[str, int], counts: Counts, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(target)
    try:
        while not stop.is_set():
            while True:  # a late answer to an earlier datagram is not this one's
                try:
                    sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
            began = time.monotonic()
            try:
                await loop.sock_sendall(sock, b"ping")
                await asyncio.wait_for(loop.sock_recv(sock, 2048), UDP_WAIT_S)
                counts.udp_ok += 1
                counts.ok("udp", began)
            except (OSError, TimeoutError) as exc:
                counts.fail(counts.udp_lost, began,
                            f"{counts.at()} datagram to {target[0]}:{target[1]} lost ({type(exc).__name__})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, PERIOD_S - (time.monotonic() - began)))
    finally:
        sock.close()


async def load(longs: list[str], news: list[str], udps: list[str], evidence: list[str]) -> dict:
    counts, stop = Counts(), asyncio.Event()
    if evidence:
        counts.evidence = Evidence(evidence[0], evidence[1], evidence[2:])
    ups = [asyncio.Event() for _ in longs for _ in range(2)]
    tasks = [asyncio.create_task(long_lived(_target(t), counts, stop, ups[2 * i + j]))
             for i, t in enumerate(longs) for j in range(2)]
    tasks += [asyncio.create_task(new_connections(_target(t), counts, stop)) for t in news]
    tasks += [asyncio.create_task(datagrams(_target(t), counts, stop)) for t in udps]
    await asyncio.wait_for(asyncio.gather(*(up.wait() for up in ups)), STALL_S * 2)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)) and line.strip() != "stop":
        if line.strip() == "mark":
            counts.mark = time.monotonic()
            print("marked", flush=True)
        elif line.strip() == "lap":
            print(json.dumps(counts.lap()), flush=True)
    stop.set()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            counts.fail(counts.resets, time.monotonic(), f"{counts.at()} {type(outcome).__name__}: {outcome}")
    return counts.result()


async def serve(namespaces: list[str]) -> None:
    # Here, not at the top: the load processes start once per moment under emulation, and pyroute2 costs
    # them seconds to import.
    from pyroute2 import netns

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        writer.close()

    servers = []
    for name in namespaces:
        for port in ECHO_PORTS:
            netns.pushns(name)
            try:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", port))
                sock.listen(256)
                sock.setblocking(False)
            finally:
                netns.popns()
            servers.append(await asyncio.start_server(echo, sock=sock))
    print("ready", flush=True)
    await asyncio.Event().wait()


def _bound(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # on every one: they share the port
    sock.bind(("0.0.0.0", port))
    sock.settimeout(STALL_S)
    return sock


def _echoes(sock: socket.socket, message: bytes) -> bool:
    sock.sendall(message)
    try:
        got = b""
        while len(got) < len(message) and (chunk := sock.recv(len(message) - len(got))):
            got += chunk
    except TimeoutError:
        return False
    return got == message


def _pod_of(node: str, sock: socket.socket, service: tuple[str, int]) -> str:
    """The pod IPVS sent this connection to (its entry in ``ipvsadm -Lnc``, in the node)."""
    address, port = sock.getsockname()
    local = f"{address}:{port}"
    out = subprocess.run(["ip", "netns", "exec", node, "ipvsadm", "-Lnc"], capture_output=True, text=True,
                         timeout=30 * SCALE, check=True).stdout
    for line in out.splitlines():
        words = line.split()
        if len(words) == 6 and words[3] == local and words[4] == f"{service[0]}:{service[1]}":
            return words[5].rpartition(":")[0]
    raise AssertionError(f"no IPVS entry for {local} -> {service[0]}:{service[1]}:\n{out}")


def shared_port(node: str, first: tuple[str, int], second: tuple[str, int]) -> dict:
    """Two Services, one client source port (connect() allows it: the destinations differ): the first
    connection must keep its replies while a connection to the second Service from its port, on its pod,
    lives. Round robin is steered there by a probe or two from other ports (no other traffic runs). The
    port lies below the ephemeral range, so no other connection of the pod takes it."""
    port = 20000 + os.getpid() % 5000
    sockets = []
    try:
        sock = _bound(port)
        sockets.append(sock)
        sock.connect(first)
        result: dict = {"port": port, "first_echoed": _echoes(sock, b"first\n"),
                        "first_pod": _pod_of(node, sock, first)}
        for _ in range(2):  # round robin over two pods: the next one after a probe elsewhere is the first's
            with socket.create_connection(second, STALL_S) as probe:
                _echoes(probe, b"probe\n")
                if _pod_of(node, probe, second) != result["first_pod"]:
                    break
        other = _bound(port)
        sockets.append(other)
        other.connect(second)
        result["second_echoed"] = _echoes(other, b"second\n")
        result["second_pod"] = _pod_of(node, other, second)
        result["first_echoed_after"] = _echoes(sock, b"first again\n")
        return result
    finally:
        for sock in sockets:
            sock.close()


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        asyncio.run(serve(argv[1:]))
        return
    if argv[:1] == ["shared-port"]:
        print(json.dumps(shared_port(argv[1], _target(argv[2]), _target(argv[3]))), flush=True)
        return
    groups: dict[str, list[str]] = {"--long": [], "--new": [], "--udp": [], "--evidence": []}
    current = None
    for word in argv[1:]:
        if word in groups:
            current = word
        elif current is not None:
            groups[current].append(word)
    print(json.dumps(asyncio.run(load(groups["--long"], groups["--new"], groups["--udp"],
                                     groups["--evidence"]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
