"""The whole data path in one real kernel (run INSIDE the QEMU guest by tests/test_kernel.py): packets cross
kipvs's nftables table and IPVS together, as programmed by the real watcher, planner and appliers.

Three nodes (network namespaces on one bridge), pods as namespaces behind Calico-named veths, each pod
answering HTTP with its name and, in ``X-Peer``, the source address it saw. The guest's root namespace
plays the outside world (192.168.50.1 and 192.168.50.200 on the bridge). Each case asserts what the client
got (which pod answered, refused, dropped) and what the pod saw (masqueraded or not).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio

from kipvs.demo import network
from kipvs.demo.cluster import Cluster, workdir_for
from kipvs.simulator.scenario import Scenario

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


def _slice(service: str, endpoints: list[tuple[str, str]]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-x1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
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
    _service("shop", {"type": "LoadBalancer", "clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30"],
                      "externalTrafficPolicy": "Local", "loadBalancerSourceRanges": [f"{OUTSIDE}/32"],
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30443,
                                 "protocol": "TCP"}]},
             {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
    _pod("web-1", "node-a", "10.244.1.11", "web"), _pod("web-2", "node-b", "10.244.2.11", "web"),
    _pod("api-1", "node-c", "10.244.3.21", "api"), _pod("shop-1", "node-a", "10.244.1.31", "shop"),
    _pod("client-1", "node-a", "10.244.1.50", "client"),
    _slice("web", [("10.244.1.11", "node-a"), ("10.244.2.11", "node-b")]),
    _slice("api", [("10.244.3.21", "node-c")]),
    _slice("shop", [("10.244.1.31", "node-a")]),
])

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
    cluster = Cluster(workdir_for(Path("/run/tmp/datapath")), "netlink", SCENARIO)
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
