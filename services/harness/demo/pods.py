"""The demo's pods: one process serving HTTP on port 8080 in every pod's network namespace (a socket
belongs to the namespace it was created in), answering with the pod's name and node
(and, in an ``X-Peer`` header, the source address the connection came from).

Commands on stdin, one per line: ``add NETNS POD NODE`` / ``del NETNS``; it prints ``ok`` after each.
Run as ``python -m services.harness.demo.pods`` by the demo, inside the guest.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from pyroute2 import netns as pyroute2_netns

PORT = 8080


UDP_PORT = 8053  # a datagram answered with the pod's name and node (tests of UDP Services)


def listening_socket(netns: str, kind: int = socket.SOCK_STREAM, port: int = PORT) -> socket.socket:
    pyroute2_netns.pushns(netns)
    try:
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # the pod's own namespace: only its own address is there
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        sock.setblocking(False)
        return sock
    finally:
        pyroute2_netns.popns()


class UdpAnswer(asyncio.DatagramProtocol):
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.body, addr)


async def main() -> None:
    servers: dict[str, asyncio.base_events.Server] = {}
    udp: dict[str, asyncio.BaseTransport] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode():
        words = line.split()
        if words[:1] == ["add"] and len(words) == 4:
            _, netns, pod, node = words
            body = f"{pod} on {node}\n".encode()

            async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, body: bytes = body) -> None:
                try:
                    await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                    # X-Peer: the source address the pod saw (tests check masquerade / its absence)
                    peer = w.get_extra_info("peername")[0].encode()
                    w.write(b"HTTP/1.0 200 OK\r\nX-Peer: %s\r\nContent-Length: %d\r\n\r\n%s"
                            % (peer, len(body), body))
                    await w.drain()
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    pass
                finally:
                    w.close()

            servers[netns] = await asyncio.start_server(answer, sock=listening_socket(netns))
            udp[netns], _ = await loop.create_datagram_endpoint(
                lambda body=body: UdpAnswer(body), sock=listening_socket(netns, socket.SOCK_DGRAM, UDP_PORT))
        elif words[:1] == ["del"] and len(words) == 2 and words[1] in servers:
            servers.pop(words[1]).close()
            udp.pop(words[1]).close()
        print("ok", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
