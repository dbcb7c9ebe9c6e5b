"""Helpers to build Kubernetes objects for tests and to point kubernetes-asyncio at the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config

from services.harness.simulator.server import Simulator


async def api_client(sim: Simulator, tmp_path: Path) -> client.ApiClient:
    path = tmp_path / "kubeconfig"
    path.write_text(sim.kubeconfig())
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    return client.ApiClient(configuration)


def service(name: str, ns: str = "default", cluster_ip: str = "10.96.0.10", ports: list[dict] | None = None,
            **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                     "selector": {"app": name}, **spec}}


def node(name: str, ip: str = "192.0.2.10", zone: str | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}


def pod(name: str, ns: str = "default", node_name: str = "node-a", ip: str = "10.244.1.5",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def endpoint_slice(name: str, service_name: str, endpoints: list[dict[str, Any]], ns: str = "default",
                   ports: list[dict] | None = None, family: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": family,
            "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


def endpoint(ip: str, node_name: str = "node-a", ready: bool = True, serving: bool | None = None,
             terminating: bool = False, zone: str | None = None, hints: list[str] | None = None,
             node_hints: list[str] | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "nodeName": node_name,
                          "conditions": {"ready": ready, "serving": ready if serving is None else serving,
                                         "terminating": terminating}}
    if zone:
        ep["zone"] = zone
    if hints is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in hints]}
    if node_hints is not None:
        ep.setdefault("hints", {})["forNodes"] = [{"name": n} for n in node_hints]
    return ep
