"""The whole data path in one real kernel (run INSIDE the QEMU guest by tests/test_kernel.py): packets cross
kipvs's nftables table and IPVS together, as programmed by the real watcher, planner and appliers.

Three nodes (network namespaces on one bridge), pods as namespaces behind Calico-named veths, each pod
answering HTTP with its name and, in ``X-Peer``, the source address it saw. The guest's root namespace
plays the outside world (192.168.50.1 and 192.168.50.200 on the bridge). Each case asserts what the client
got (which pod answered, refused, dropped) and what the pod saw (masqueraded or not).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio

from services.harness.demo import network
from services.harness.demo.cluster import Cluster, workdir_for
from services.harness.simulator.scenario import Scenario

NODES = {"node-a": "192.168.50.11", "node-b": "192.168.50.12", "node-c": "192.168.50.13"}
OUTSIDE, STRANGER = "192.168.50.1", "192.168.50.200"  # the root namespace: an allowed and a refused source
LB_IP = "198.51.100.7"


def _node(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": NODES[name]}]}}


def _pod(name: str, node: str, ip: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "c"}]},
            "status": {"phase": "Running", "podIP": ip}}


def _slice(service: str, endpoints: list[tuple[str, str]], port: tuple[str, int, str] = ("http", 8080, "TCP")) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-x1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": port[0], "port": port[1], "protocol": port[2]}],
            "endpoints": [{"addresses": [ip], "nodeName": node,
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for ip, node in endpoints]}


def _service(name: str, spec: dict, status: dict | None = None) -> dict:
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"selector": {"app": name}, **spec}}
    if status:
        obj["status"] = status
    return obj


SCENARIO = Scenario(objects=[
    _node("node-a"), _node("node-b"), _node("node-c"),
    _service("web", {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    _service("api", {"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                     "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "nodePort": 30080,
                                "protocol": "TCP"}]}),
    _service("dns", {"type": "ClusterIP", "clusterIP": "10.96.0.53", "clusterIPs": ["10.96.0.53"],
                     "ports": [{"name": "dns", "port": 53, "targetPort": 8053, "protocol": "UDP"}]}),
    _service("shop", {"type": "LoadBalancer", "clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30"],
                      "externalTrafficPolicy": "Local", "loadBalancerSourceRanges": [f"{OUTSIDE}/32"],
                      "healthCheckNodePort": 32210,
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30443,
                                 "protocol": "TCP"}]},
             {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
    _pod("web-1", "node-a", "10.244.1.11", "web"), _pod("web-2", "node-b", "10.244.2.11", "web"),
    _pod("api-1", "node-c", "10.244.3.21", "api"), _pod("shop-1", "node-a", "10.244.1.31", "shop"),
    _pod("client-1", "node-a", "10.244.1.50", "client"), _pod("udp-1", "node-b", "10.244.2.53", "dns"),
    _slice("web", [("10.244.1.11", "node-a"), ("10.244.2.11", "node-b")]),
    _slice("api", [("10.244.3.21", "node-c")]),
    _slice("shop", [("10.244.1.31", "node-a")]),
    _slice("dns", [("10.244.2.53", "node-b")], port=("dns", 8053, "UDP")),
])
APPLIER_ARGS = ("--ipvs-tcp-timeout", "901", "--ipvs-udp-timeout", "301", "--ipvs-strict-arp",
                # to show the UDP test needs the cleanup: KIPVS_TEST_NO_CONNTRACK_CLEANUP=1 makes it fail
                *(("--no-conntrack-cleanup",) if os.environ.get("KIPVS_TEST_NO_CONNTRACK_CLEANUP") else ()))

CLIENT = textwrap.dedent("""
    import json, socket, sys
    host, port, count, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    out = []
    for _ in range(count):
        s = socket.socket(); s.settimeout(2.0)
        if source:
            s.bind((source, 0))
        try:
            s.connect((host, port))
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            peer = [l.split(b": ", 1)[1].decode() for l in head.split(b"\\r\\n") if l.startswith(b"X-Peer:")]
            out.append([body.decode().split(" on ")[0], peer[0] if peer else ""])
        except ConnectionRefusedError:
            out.append(["refused", ""])
        except OSError:
            out.append(["dropped", ""])
        finally:
            s.close()
    print(json.dumps(out))
""")


def connect(where: str | None, host: str, port: int, count: int = 1, source: str = "") -> list[tuple[str, str]]:
    """``count`` HTTP requests from namespace ``where`` (None: the guest's root namespace, the outside):
    [(pod that answered | refused | dropped, the source address the pod saw)]."""
    prefix = ["ip", "netns", "exec", where] if where else []
    done = subprocess.run([*prefix, sys.executable, "-c", CLIENT, host, str(port), str(count), source],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [tuple(x) for x in json.loads(done.stdout)]


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    cluster = Cluster(workdir_for(Path("/run/tmp/datapath")), "netlink", SCENARIO, applier_args=APPLIER_ARGS)
    try:
        await cluster.start_nats()
        await cluster.start_simulator()
        for service in ("watcher", "planner", *(f"applier-{n}" for n in cluster.node_names())):
            await cluster.start(service)
        await cluster.converged(within=180)
        network.sh("ip", "addr", "add", f"{STRANGER}/24", "dev", network.BRIDGE)
        network.sh("ip", "route", "add", LB_IP, "via", NODES["node-a"])  # the cloud LB sends to node-a
        yield cluster
    finally:
        await cluster.stop()


def pods(results: list[tuple[str, str]]) -> set[str]:
    return {pod for pod, _ in results}


async def test_cluster_ip_from_a_pod_keeps_the_pod_source(cluster: Cluster) -> None:
    results = connect("pod-client-1", "10.96.0.10", 80, count=12)
    assert pods(results) == {"web-1", "web-2"}, results
    assert {peer for _, peer in results} == {"10.244.1.50"}, "no SNAT from inside the cluster CIDR"


async def test_cluster_ip_from_the_node_is_masqueraded(cluster: Cluster) -> None:
    # Without masquerade the node's source would be the VIP itself (its route is local), and the reply from
    # node-b would go to node-b's own copy of the VIP: the connection would hang.
    results = connect("node-a", "10.96.0.10", 80, count=12)
    assert pods(results) == {"web-1", "web-2"}, results
    assert {peer for _, peer in results} == {NODES["node-a"]}, results


async def test_node_port_on_a_node_address_is_masqueraded(cluster: Cluster) -> None:
    results = connect(None, NODES["node-b"], 30080, count=3, source=OUTSIDE)
    assert results == [("api-1", NODES["node-b"])] * 3, "forwarded to node-c, replies back through node-b"


async def test_load_balancer_source_ranges_and_local_policy_keep_the_client_address(cluster: Cluster) -> None:
    assert connect(None, LB_IP, 80, count=3, source=OUTSIDE) == [("shop-1", OUTSIDE)] * 3
    assert connect(None, LB_IP, 80, count=1, source=STRANGER) == [("dropped", "")]
    # externalTrafficPolicy Local on the node port too: no SNAT, the pod sees the client
    assert connect(None, NODES["node-a"], 30443, count=2, source=STRANGER) == [("shop-1", STRANGER)] * 2


async def test_vip_port_filter_refuses_ports_that_are_no_service_port(cluster: Cluster) -> None:
    # A node-wide listener (as sshd or the kubelet): reachable on the node's address, not through a VIP.
    listener = subprocess.Popen(["ip", "netns", "exec", "node-a", sys.executable, "-c",
                                 "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
                                 "socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9999));s.listen();"
                                 "print('ready',flush=True);time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        probe = textwrap.dedent("""
            import socket, sys
            for host in sys.argv[1:]:
                s = socket.socket(); s.settimeout(2)
                try:
                    s.connect((host, 9999)); print(host, "connected")
                except ConnectionRefusedError:
                    print(host, "refused")
                except OSError:
                    print(host, "dropped")
        """)
        done = subprocess.run(["ip", "netns", "exec", "pod-client-1", sys.executable, "-c", probe,
                               NODES["node-a"], "10.96.0.10", LB_IP], capture_output=True, text=True, timeout=30)
        assert done.stdout.split("\n")[:3] == [f"{NODES['node-a']} connected", "10.96.0.10 refused",
                                               f"{LB_IP} refused"], done.stdout + done.stderr
    finally:
        listener.kill()
        listener.wait()


async def test_hairpin_a_pod_reaches_itself_through_its_service(cluster: Cluster) -> None:
    results = connect("pod-web-1", "10.96.0.10", 80, count=16)
    assert "dropped" not in pods(results) and pods(results) == {"web-1", "web-2"}, results
    to_itself = {peer for pod, peer in results if pod == "web-1"}
    # KUBE-LOOP-BACK: a pod answering itself must not see its own address as the source (its reply would
    # skip IPVS's reverse NAT); kipvs masquerades that flow.
    assert to_itself and "10.244.1.11" not in to_itself, results


async def test_calico_endpoint_marks_are_set_on_input_and_seen_after_ipvs(cluster: Cluster) -> None:
    planner = await cluster.planned()
    calico = planner.node_calico("node-a")
    mask = calico.layout.endpoint_mask
    marks = {iface: mark for iface, mark in calico.endpoint_marks.items()}
    client_mark = marks[cluster.pods["client-1"].host_interface]
    assert client_mark & mask == client_mark and client_mark != 0
    # After IPVS has rewritten the packet to a real server (OUTPUT, where Felix's policy reads the mark,
    # before kipvs clears the endpoint bits at filter+10), count the new connections carrying the client's
    # mark. Only a connection's first packet is marked: policy decides there, conntrack carries the rest.
    nft = textwrap.dedent(f"""
        table inet probe {{
            chain out {{
                type filter hook output priority filter + 5; policy accept;
                ct state new ip daddr {{ 10.244.1.11, 10.244.2.11 }} meta mark & {mask:#x} == {client_mark:#x} counter
                ct state new ip daddr {{ 10.244.1.11, 10.244.2.11 }} counter
            }}
        }}
    """)
    subprocess.run(["ip", "netns", "exec", "node-a", "nft", "-f", "-"], input=nft, text=True, check=True)
    try:
        results = connect("pod-client-1", "10.96.0.10", 80, count=4)
        assert "dropped" not in pods(results)
        listed = subprocess.run(["ip", "netns", "exec", "node-a", "nft", "-j", "list", "chain", "inet", "probe", "out"],
                                capture_output=True, text=True, check=True).stdout
        counters = [e["counter"]["packets"] for item in json.loads(listed)["nftables"] if "rule" in item
                    for e in item["rule"]["expr"] if "counter" in e]
        assert counters[0] == counters[1] >= 4, (counters, f"mark {client_mark:#x} mask {mask:#x}")
    finally:
        subprocess.run(["ip", "netns", "exec", "node-a", "nft", "delete", "table", "inet", "probe"], check=True)


# --- the node features kube-proxy users rely on (issue 15) ---------------------------------------


def _http(where: str | None, url: str) -> tuple[int, dict]:
    script = textwrap.dedent("""
        import json, sys, urllib.error, urllib.request
        try:
            with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
                print(json.dumps([r.status, json.loads(r.read())]))
        except urllib.error.HTTPError as e:
            print(json.dumps([e.code, json.loads(e.read())]))
        except OSError as e:
            print(json.dumps([0, {"error": str(e)}]))
    """)
    prefix = ["ip", "netns", "exec", where] if where else []
    done = subprocess.run([*prefix, sys.executable, "-c", script, url], capture_output=True, text=True, timeout=30)
    status, body = json.loads(done.stdout)
    return status, body


async def _until(check, within: float = 60.0) -> None:
    from services.harness.guest.vm import time_scale

    deadline = asyncio.get_running_loop().time() + within * time_scale()
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def test_health_check_node_port_follows_the_local_endpoints(cluster: Cluster) -> None:
    url = {node: f"http://{ip}:32210/healthz" for node, ip in NODES.items()}
    status, body = _http(None, url["node-a"])
    assert (status, body) == (200, {"service": {"namespace": "default", "name": "shop"}, "localEndpoints": 1,
                                    "serviceProxyHealthy": True})
    assert _http(None, url["node-b"])[0] == 503, "no local endpoint on node-b"
    # The pod moves to node-b: within one delta, node-a says 503 and node-b 200.
    moved = _pod("shop-2", "node-b", "10.244.2.31", "shop")
    await cluster.add_pod(moved)
    await cluster.sim.apply(moved)
    await cluster.sim.apply(_slice("shop", [("10.244.2.31", "node-b")]))

    async def moved_over() -> bool:
        return _http(None, url["node-a"])[0] == 503 and _http(None, url["node-b"])[0] == 200
    await _until(moved_over)
    # Policy Cluster: no health-check node port any more (the API server drops it); the port closes.
    shop = next(o for o in SCENARIO.objects if o["kind"] == "Service" and o["metadata"]["name"] == "shop")
    cluster_policy = json.loads(json.dumps(shop))
    cluster_policy["spec"]["externalTrafficPolicy"] = "Cluster"
    del cluster_policy["spec"]["healthCheckNodePort"]
    await cluster.sim.apply(cluster_policy)

    async def closed() -> bool:
        return _http(None, url["node-b"])[0] == 0
    await _until(closed)
    await cluster.sim.apply(shop)  # back as it was, for the tests after this one


async def test_node_health_port(cluster: Cluster) -> None:
    status, body = _http("node-a", "http://127.0.0.1:10256/healthz")
    assert status == 200 and body["nodeEligible"] is True and "lastUpdated" in body


async def test_ipvs_timeouts_and_strict_arp_read_back_from_the_kernel(cluster: Cluster) -> None:
    out = subprocess.run(["ip", "netns", "exec", "node-a", "ipvsadm", "-L", "--timeout"], capture_output=True,
                         text=True, check=True).stdout
    assert "Timeout (tcp tcpfin udp): 901 120 301" in out, out
    for key, want in (("arp_ignore", "1"), ("arp_announce", "2")):
        got = subprocess.run(["ip", "netns", "exec", "node-a", "sysctl", "-n", f"net.ipv4.conf.all.{key}"],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert got == want, (key, got)


UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.bind(("0.0.0.0", 45053))  # one client socket, the same source port every time, as a resolver
    while sys.stdin.readline():  # the test says when to ask
        s.sendto(b"q", ("10.96.0.53", 53))  # one datagram, one answer (no retry that would hide a loss)
        try:
            print(s.recv(100).decode().split(" on ")[0], flush=True)
        except OSError:
            print("no answer", flush=True)
""")


CONNTRACK_REPLIES = textwrap.dedent("""
    import asyncio, socket, sys
    from pyroute2.conntrack import AsyncConntrack, NFCTAttrTuple
    async def main():
        ct = AsyncConntrack(nfgen_family=socket.AF_INET)
        await ct.__aenter__()
        orig = NFCTAttrTuple(family=socket.AF_INET, proto=17, daddr="10.96.0.53", dport=53)
        replies = [e.tuple_reply.saddr async for e in await ct.dump_entries(tuple_orig=orig)]
        ct.close()
        print(" ".join(sorted(replies)))
    asyncio.run(main())
""")


def conntrack_replies(node: str) -> list[str]:
    """Where the node's conntrack entries for the UDP ClusterIP say replies come from."""
    out = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", CONNTRACK_REPLIES],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


async def test_udp_client_follows_its_service_through_no_endpoints_and_a_new_pod(cluster: Cluster) -> None:
    """kube-proxy's conntrack cleanup: the classic report is a resolver whose queries went to the node
    itself while CoreDNS had no ready pod, and kept going there once it had one. The entries are checked
    in the node's conntrack table (the assertions fail with KIPVS_TEST_NO_CONNTRACK_CLEANUP=1). Since
    Linux 5.9, IPVS with expire_nodest_conn=1 (which kipvs sets, as kube-proxy does) flushes a deleted real
    server's connections and their conntrack entries itself; the test turns that off on node-a to stand
    for the older kernels many IPVS users still run."""
    # As on kernels before 5.9, whose IPVS does not flush a deleted real server's connections (and their
    # conntrack entries) by itself when it is deleted: only kipvs's cleanup then removes them.
    subprocess.run(["ip", "netns", "exec", "node-a", "sysctl", "-qw", "net.ipv4.vs.expire_nodest_conn=0"], check=True)
    client = subprocess.Popen(["ip", "netns", "exec", "pod-client-1", sys.executable, "-c", UDP_CLIENT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask() -> str:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write("\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert ask() == "udp-1"
        assert conntrack_replies("node-a") == ["10.244.2.53"], "the flow is tracked, replies from udp-1"
        await cluster.remove_pod("udp-1")  # the only pod goes: no endpoint at all
        await cluster.sim.delete("Pod", "default", "udp-1")
        await cluster.sim.apply(_slice("dns", [], port=("dns", 8053, "UDP")))
        await cluster.converged(within=120)
        assert conntrack_replies("node-a") == [], "the entry pointing at the pod that left is deleted"
        # kube-proxy's setting again: IPVS's own connection to the deleted server expires at the next packet
        subprocess.run(["ip", "netns", "exec", "node-a", "sysctl", "-qw", "net.ipv4.vs.expire_nodest_conn=1"],
                       check=True)
        assert ask() == "no answer"
        new = _pod("udp-2", "node-c", "10.244.3.53", "dns")  # a new pod, elsewhere
        await cluster.add_pod(new)
        await cluster.sim.apply(new)
        await cluster.sim.apply(_slice("dns", [("10.244.3.53", "node-c")], port=("dns", 8053, "UDP")))
        await cluster.converged(within=120)
        assert conntrack_replies("node-a") == [], "the entry of the time without endpoints is deleted"
        answer = ask()
    finally:
        client.kill()
        client.wait()
    assert answer == "udp-2", "the same client socket reaches the new pod (stale conntrack entry deleted)"
