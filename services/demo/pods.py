"""The demo's pods: one process serving HTTP on port 8080 in every pod's network namespace (a socket
belongs to the namespace it was created in), answering with the pod's name and node
(and, in an ``X-Peer`` header, the source address the connection came from).

Commands on stdin, one per line: ``add NETNS POD NODE`` / ``del NETNS``; it prints ``ok`` after each.
Run as ``python -m kipvs.demo.pods`` by the demo, inside the guest.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from pyroute2 import netns as pyroute2_netns

PORT = 8080


def listening_socket(netns: str) -> socket.socket:
    pyroute2_netns.pushns(netns)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", PORT))  # the pod's own namespace: only its own address is there
        sock.listen(64)
        sock.setblocking(False)
        return sock
    finally:
        pyroute2_netns.popns()


async def main() -> None:
    servers: dict[str, asyncio.base_events.Server] = {}
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
        elif words[:1] == ["del"] and len(words) == 2 and words[1] in servers:
            servers.pop(words[1]).close()
        print("ok", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
