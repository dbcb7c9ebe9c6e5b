"""A real ``kipvs applier`` started as kube-proxy would be: a KubeProxyConfiguration file and kube-proxy's
flags, a real nats-server; /proxyMode, /metrics and the node health server scraped over HTTP; a bad file
refused in one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

from shared.messaging.embedded_nats import free_loopback_port
from tests.stack import Scrape

KIPVS = str(Path(sys.executable).with_name("kipvs"))


def kube_proxy_file(tmp_path: Path, metrics: int, health: int, mode: str = "ipvs") -> Path:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: {mode}
hostnameOverride: node-a
metricsBindAddress: 127.0.0.1:{metrics}
healthzBindAddress: 127.0.0.1:{health}
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
conntrack:
  maxPerCore: 32768
ipvs:
  scheduler: lc
  syncPeriod: 45s
  minSyncPeriod: 1s
  tcpTimeout: 16m
""")
    return path


async def get(http: aiohttp.ClientSession, url: str, within: float = 30.0) -> tuple[int, str, str]:
    """(status, content type, body) of the first answer, retried while nothing listens yet."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            async with http.get(url) as r:
                return r.status, r.content_type, await r.text()
        except aiohttp.ClientConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"nothing answered at {url} within {within}s") from None
            await asyncio.sleep(0.2)


async def test_applier_runs_from_a_kube_proxy_config_and_flags(nats_url: str, tmp_path: Path) -> None:
    metrics, health = free_loopback_port(), free_loopback_port()
    path = kube_proxy_file(tmp_path, metrics, health)
    proc = subprocess.Popen([KIPVS, "applier", "--config", str(path), "--backend", "memory", "--nats-url", nats_url,
                             "--ipvs-udp-timeout", "7m", "--v=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            assert await get(http, f"http://127.0.0.1:{metrics}/proxyMode") == (200, "text/plain", "ipvs")
            codes = [(await get(http, f"http://127.0.0.1:{health}/healthz"))[0] for _ in range(3)]
            assert (await get(http, f"http://127.0.0.1:{health}/livez"))[0] == 200
            status, _, text = await get(http, f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200
        scrape = Scrape.parse(text)
        for code in ("200", "503"):
            assert scrape.value("kipvs_proxy_healthz_total", code=code) == codes.count(int(code)), (code, codes)
        assert scrape.value("kipvs_proxy_livez_total", code="200") == 1
        for name in ("kipvs_sync_proxy_rules_service_changes_total", "kipvs_sync_proxy_rules_endpoint_changes_total",
                     "kipvs_sync_proxy_rules_last_queued_timestamp_seconds"):
            assert scrape.value(name) >= 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # the file's and the flags' timeouts reached the (simulated) kernel: 16m and 7m in seconds
    assert "-> Timeouts(tcp=960, tcp_fin=0, udp=420)" in err, err
    warnings = [line for line in err.splitlines() if "WARNING" in line and "kipvs.config" in line]
    assert any("ipvs.scheduler in config file" in line and "cluster-wide" in line for line in warnings), err
    assert any(f"no meaning in kipvs, ignored: ipvs.minSyncPeriod in config file {path}" in line
               for line in warnings), err
    # conntrack.maxPerCore x this host's CPUs, as kube-proxy computes it
    assert f"conntrack: net.netfilter.nf_conntrack_max={32768 * (os.cpu_count() or 1)}" in err, err
    assert any("only by the watcher and the auth service: clientConnection.kubeconfig" in line
               for line in warnings), err
    assert "Traceback" not in err


async def test_a_bind_address_without_a_host_listens_on_every_interface(nats_url: str) -> None:
    """``--metrics-bind-address :PORT`` is every interface to kube-proxy (Go's net.Listen), as is
    ``--healthz-bind-address :PORT``: a Prometheus scraping the node's address reaches it. 127.0.0.2 is
    another address of the loopback interface; a socket bound to 127.0.0.1 alone would refuse it."""
    metrics, health = free_loopback_port(), free_loopback_port()
    proc = subprocess.Popen([KIPVS, "applier", "--node", "node-a", "--backend", "memory", "--nats-url", nats_url,
                             f"--metrics-bind-address=:{metrics}", f"--healthz-bind-address=:{health}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "127.0.0.2"):
                assert await get(http, f"http://{host}:{metrics}/proxyMode") == (200, "text/plain", "ipvs"), host
                assert (await get(http, f"http://{host}:{health}/livez"))[0] == 200, host
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"health and metrics on http://*:{metrics}/" in err, err


async def test_a_kube_proxy_file_in_another_mode_is_refused_in_one_line(tmp_path: Path) -> None:
    path = kube_proxy_file(tmp_path, free_loopback_port(), free_loopback_port(), mode="nftables")
    done = await asyncio.to_thread(subprocess.run, [KIPVS, "applier", "--config", str(path), "--backend", "memory"],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (f"kipvs applier: mode in config file {path} is 'nftables': kipvs is an IPVS proxy; set "
                           "it to ipvs (or leave it out)\n")
