"""kube-proxy's configuration taken by kipvs: a KubeProxyConfiguration file, kube-proxy's flag spellings,
Go durations and -v (pure and fast: config.load and argparse, no bus)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest

from services.applier.main import ApplierConfig
from services.planner.main import PlannerServiceConfig
from services.watcher.main import WatcherConfig
from shared.service import config
from shared.service.go_duration import parse_duration

# What kubeadm writes (every field, most at their zero value), with kube-proxy IPVS settings filled in.
KUBEADM = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: 65536
  min: null
  tcpCloseWaitTimeout: 1h
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ClusterCIDR
enableProfiling: false
featureGates: {}
healthzBindAddress: 127.0.0.1:10256
hostnameOverride: node-a
iptables:
  localhostNodePorts: null
  masqueradeAll: true
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 1s
  scheduler: lc
  strictARP: true
  syncPeriod: 45s
  tcpFinTimeout: 2m
  tcpTimeout: 15m
  udpTimeout: 1m30s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 4
metricsBindAddress: 127.0.0.1:10249
mode: ipvs
nodePortAddresses:
- 10.0.0.0/8
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def _file(tmp_path: Path, text: str, name: str = "kube-proxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kipvs.config" and r.levelno == logging.WARNING]


@pytest.fixture
def caplog_config(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Warnings of kipvs.config, captured although config.load sets the root logger up (it replaces its
    handlers; caplog's handler is put back on the logger itself)."""
    logging.getLogger("kipvs.config").addHandler(caplog.handler)
    yield caplog
    logging.getLogger("kipvs.config").removeHandler(caplog.handler)


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("30s", 30.0), ("15m", 900.0), ("1h2m3s", 3723.0),
                                                ("1.5h", 5400.0), ("300ms", 0.3), ("-2s", -2.0), ("1m30s", 90.0),
                                                ("2us", 2e-6), ("2\u00b5s", 2e-6), (".5s", 0.5), ("+1s", 1.0)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "why"), [("", "not a duration"), ("15", "a number without a unit"),
                                           ("15x", "cannot read '15x'"), ("1h 2m", "cannot read ' 2m'"),
                                           ("s", "cannot read 's'"), ("-", "not a duration")])
def test_not_go_durations(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


def test_a_kubeadm_file_configures_the_applier(tmp_path: Path, caplog_config: pytest.LogCaptureFixture) -> None:
    cfg = config.load(ApplierConfig, {"config": _file(tmp_path, KUBEADM)}, {})
    assert cfg.node == "node-a"
    assert (cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout) == (900, 120, 90)
    assert cfg.drift_period == 45.0 and cfg.ipvs_strict_arp and cfg.masquerade_all
    assert cfg.cluster_cidr == ["10.244.0.0/16", "fd00:10:244::/56"]
    assert (cfg.node_addresses, cfg.nodeport_cidrs) == ("interfaces", ["10.0.0.0/8"])
    assert (cfg.http_listen, cfg.healthz_bind_address, cfg.log_level) == ("127.0.0.1:10249", "127.0.0.1:10256",
                                                                          "debug")
    assert (cfg.conntrack_max_per_core, cfg.conntrack_min, cfg.conntrack_tcp_timeout_established) == (65536, 0, 0)
    assert (cfg.conntrack_tcp_timeout_close_wait, cfg.conntrack_udp_timeout) == (3600, 0)
    lines = _warnings(caplog_config)
    path = tmp_path / "kube-proxy.yaml"
    # every non-zero field kipvs cannot use, in one line; zero values (kubeadm's "unset") in none
    ignored = [line for line in lines if "no meaning in kipvs" in line]
    assert len(ignored) == 1, lines
    for name in ("ipvs.minSyncPeriod", "oomScoreAdj"):
        assert f"{name} in config file {path}" in ignored[0]
    for zero in ("logging.options", "bindAddress", "configSyncPeriod", "conntrack.udpTimeout", "featureGates",
                 "iptables.syncPeriod"):
        assert f"{zero} in config file" not in " ".join(lines), zero
    # what only another service honours: said, one line each
    assert any("ipvs.scheduler" in line and "cluster-wide" in line and "kipvs.io/scheduler" in line
               for line in lines), lines
    assert any("only by the watcher and the auth service: clientConnection.kubeconfig" in line for line in lines)
    assert all("\n" not in line for line in lines)


def test_the_same_file_gives_the_planner_its_scheduler(tmp_path: Path,
                                                         caplog_config: pytest.LogCaptureFixture) -> None:
    cfg = config.load(PlannerServiceConfig, {"config": _file(tmp_path, KUBEADM)}, {})
    assert cfg.scheduler == "lc" and cfg.log_level == "debug"
    # kube-proxy's metrics port is the applier's: a planner on the same host keeps its own default
    assert cfg.http_listen == "127.0.0.1:0"
    lines = _warnings(caplog_config)
    applier_only = [line for line in lines if "only by the applier (on each node)" in line]
    assert len(applier_only) == 1 and "hostnameOverride" in applier_only[0] and "ipvs.tcpTimeout" in applier_only[0]
    assert "metricsBindAddress" in applier_only[0]
    # a flag is the operator's choice for this service
    flags = _parse(PlannerServiceConfig, ["--config", str(tmp_path / "kube-proxy.yaml"),
                                          "--metrics-bind-address", "127.0.0.1:9"])
    assert config.load(PlannerServiceConfig, flags, {}).http_listen == "127.0.0.1:9"
    assert not any("ipvs.scheduler" in line for line in lines)


def test_unknown_fields_are_warned_not_dropped(tmp_path: Path, caplog_config: pytest.LogCaptureFixture) -> None:
    text = KUBEADM.replace("mode: ipvs", "mode: ipvs\nipvsTypo: 3")
    config.load(ApplierConfig, {"config": _file(tmp_path, text)}, {})
    assert any("not KubeProxyConfiguration kubeproxy.config.k8s.io/v1alpha1 fields, ignored: ipvsTypo" in line
               for line in _warnings(caplog_config))


def test_kipvs_own_file_keeps_working(tmp_path: Path) -> None:
    path = _file(tmp_path, "node: node-b\ndrift-period: 1m\nipvs_tcp_timeout: 600\ncluster_cidr: [10.0.0.0/8]\n")
    cfg = config.load(ApplierConfig, {"config": path}, {})
    assert (cfg.node, cfg.drift_period, cfg.ipvs_tcp_timeout, cfg.cluster_cidr) == ("node-b", 60.0, 600, ["10.0.0.0/8"])


@pytest.mark.parametrize(("change", "error"), [
    (("mode: ipvs", "mode: iptables"), r"^mode in config file \S+ is 'iptables': kipvs is an IPVS proxy; set it to "
                                       r"ipvs \(or leave it out\)$"),
    (("kind: KubeProxyConfiguration", "kind: ConfigMap"), r"is a kubeproxy.config.k8s.io/v1alpha1/ConfigMap, not a "
                                                          r".*config.conf\)$"),
    (("v1alpha1", "v1beta9"), r"is a kubeproxy.config.k8s.io/v1beta9/KubeProxyConfiguration, not a kubeproxy"),
    (("tcpTimeout: 15m", 'tcpTimeout: "15"'), r"^ipvs.tcpTimeout in config file \S+: '15' is not a duration \(a number "
                                            r"without a unit"),
    (("tcpTimeout: 15m", "tcpTimeout: 900"), r"^ipvs.tcpTimeout in config file \S+ must be a duration string"),
    (("tcpTimeout: 15m", "tcpTimeout: 200ms"), r"is under a second, the kernel's resolution$"),
    (("strictARP: true", "strictARP: maybe"), r"^ipvs.strictARP in config file \S+ must be true or false, got "
                                              r"'maybe'$"),
    (("clusterCIDR: 10.244.0.0/16,", "clusterCIDR: 10.244.0.0/33,"), r"'10.244.0.0/33' is not a CIDR"),
    (("- 10.0.0.0/8", "- primary\n- 10.0.0.0/8"), r"primary with CIDRs is not supported"),
    (("- 10.0.0.0/8", "- localhost"), r"^nodePortAddresses in config file \S+: localhost: NodePorts are not served"),
    (("verbosity: 4", "verbosity: loud"), r"^logging.verbosity in config file \S+ must be a verbosity 0 or above"),
    (("metricsBindAddress: 127.0.0.1:10249", "metricsBindAddress: localhost"), r"http_listen must be host:port"),
])
def test_bad_kube_proxy_file_is_one_line(tmp_path: Path, change: tuple[str, str], error: str) -> None:
    assert change[0] in KUBEADM
    path = _file(tmp_path, KUBEADM.replace(*change))
    with pytest.raises(config.ConfigError, match=error) as raised:
        config.load(ApplierConfig, {"config": path}, {})
    assert "\n" not in str(raised.value)


def _parse(cls: type, argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    config.add_flags(parser, cls)
    parser.format_help()
    return vars(parser.parse_args(argv))


def test_kube_proxy_flags_on_the_applier(caplog_config: pytest.LogCaptureFixture) -> None:
    flags = _parse(ApplierConfig, [
        "--hostname-override", " Node-C ", "--ipvs-tcp-timeout", "15m", "--ipvs-tcpfin-timeout", "30s",
        "--ipvs-udp-timeout=1h2m3s", "--ipvs-sync-period", "1m", "--nodeport-addresses", "10.0.0.0/8,fd00::/8",
        "--masquerade-all=true", "--ipvs-strict-arp=false", "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56",
        "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "", "-v", "4", "--proxy-mode", "ipvs",
        "--ipvs-scheduler", "sh", "--conntrack-max-per-core", "0", "--oom-score-adj=-999", "--drain-timeout", "2m",
        "--conntrack-tcp-timeout-established", "24h", "--conntrack-tcp-be-liberal"])
    cfg = config.load(ApplierConfig, flags, {})
    assert cfg.node == "node-c"
    assert (cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout) == (900, 30, 3723)
    assert (cfg.drift_period, cfg.drain_timeout) == (60.0, 120.0)
    assert (cfg.node_addresses, cfg.nodeport_cidrs) == ("interfaces", ["10.0.0.0/8", "fd00::/8"])
    assert cfg.masquerade_all and not cfg.ipvs_strict_arp
    assert (cfg.conntrack_max_per_core, cfg.conntrack_tcp_timeout_established, cfg.conntrack_tcp_be_liberal) == (
        0, 86400, True)
    assert cfg.cluster_cidr == ["10.244.0.0/16", "fd00:10:244::/56"]
    assert (cfg.http_listen, cfg.healthz_bind_address, cfg.log_level) == ("127.0.0.1:0", "", "debug")
    lines = _warnings(caplog_config)
    assert any(line.startswith("flag --ipvs-scheduler: not honoured by this service: the IPVS scheduler is "
                               "cluster-wide") for line in lines), lines
    assert any(line.startswith("kube-proxy settings with no meaning in kipvs, ignored: flag --oom-score-adj")
               for line in lines), lines
    assert not any("conntrack" in line for line in lines)


@pytest.mark.parametrize(("argv", "level"), [(["-v", "4"], "debug"), (["--v=2"], "info"), (["-v5"], "debug"),
                                              (["--v", "0"], "info")])
def test_v_is_a_log_level(argv: list[str], level: str) -> None:
    assert config.load(PlannerServiceConfig, _parse(PlannerServiceConfig, argv), {}).log_level == level


def test_planner_takes_ipvs_scheduler_and_says_what_it_cannot(caplog_config: pytest.LogCaptureFixture) -> None:
    flags = _parse(PlannerServiceConfig, ["--ipvs-scheduler", "wrr", "--ipvs-tcp-timeout", "15m",
                                          "--masquerade-all", "--hostname-override", "n", "--conntrack-min", "0"])
    assert config.load(PlannerServiceConfig, flags, {}).scheduler == "wrr"
    lines = _warnings(caplog_config)
    assert lines == ["not honoured by this service, only by the applier (on each node): flag --hostname-override, "
                     "flag --ipvs-tcp-timeout, flag --masquerade-all, flag --conntrack-min"], lines


def test_watcher_takes_kubeconfig_from_either_spelling(tmp_path: Path) -> None:
    path = _file(tmp_path, KUBEADM)
    assert config.load(WatcherConfig, {"config": path}, {}).kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert config.load(WatcherConfig, _parse(WatcherConfig, ["--kubeconfig", "/k"]), {}).kubeconfig == "/k"


@pytest.mark.parametrize(("argv", "error"), [
    (["--ipvs-tcp-timeout", "15x"], r"^invalid configuration: ipvs-tcp-timeout \(from flag --ipvs-tcp-timeout\): "
                                    r"'15x' is not a duration"),
    (["--ipvs-sync-period", "soon"], r"^flag --ipvs-sync-period: 'soon' is not a duration"),
    (["--proxy-mode", "nftables"], r"^flag --proxy-mode is 'nftables': kipvs is an IPVS proxy"),
    (["--nodeport-addresses", "10.0.0.0/40"], r"^flag --nodeport-addresses: '10.0.0.0/40' is not a CIDR"),
    (["-v", "loud"], r"^flag --v must be a verbosity 0 or above, got 'loud'$"),
    (["--drift-period=-1s"], r"from flag --drift-period"),
])
def test_bad_flag_is_one_line(argv: list[str], error: str) -> None:
    flags = _parse(ApplierConfig, ["--node", "n", *argv])
    with pytest.raises(config.ConfigError, match=error) as raised:
        config.load(ApplierConfig, flags, {})
    assert "\n" not in str(raised.value)


def test_go_boolean_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert _parse(ApplierConfig, ["--masquerade-all"])["masquerade_all"] is True
    assert _parse(ApplierConfig, ["--masquerade-all=false"])["masquerade_all"] is False
    assert _parse(ApplierConfig, ["--no-masquerade-all"])["masquerade_all"] is False
    with pytest.raises(SystemExit):
        _parse(ApplierConfig, ["--masquerade-all=maybe"])
    assert "--masquerade-all must be true or false, got 'maybe'" in capsys.readouterr().err


def test_a_bad_value_names_the_flag_or_variable_it_came_from() -> None:
    """A check in the settings' ``__post_init__`` names the setting (http_listen); the user gave a flag or a
    variable, maybe kube-proxy's spelling: the error names that too."""
    cases = ((["--node", "n", "--metrics-bind-address", ":99999"], {}, "flag --metrics-bind-address"),
             (["--node", "n", "--http-listen", ":99999"], {}, "flag --http-listen"),
             (["--node", "n", "--ipvs-exclude-cidrs", "10.0.0.0/33"], {}, "flag --ipvs-exclude-cidrs"),
             (["--node", "n"], {"KIPVS_CLUSTER_CIDR": "10.0.0.0/33"}, "environment variable KIPVS_CLUSTER_CIDR"))
    for argv, environ, source in cases:
        with pytest.raises(config.ConfigError, match=rf"^invalid configuration \(from {source}\): ") as raised:
            config.load(ApplierConfig, _parse(ApplierConfig, argv), environ)
        assert "\n" not in str(raised.value)


def test_durations_in_environment_and_the_applier_default_listen() -> None:
    cfg = config.load(ApplierConfig, {"node": "n"}, {"KIPVS_DRIFT_PERIOD": "2m", "KIPVS_IPVS_UDP_TIMEOUT": "30"})
    assert (cfg.drift_period, cfg.ipvs_udp_timeout) == (120.0, 30)
    assert cfg.http_listen == "127.0.0.1:10249"  # kube-proxy's --metrics-bind-address default
    # with --shadow kube-proxy holds that port: any free one
    assert config.load(ApplierConfig, {"node": "n", "shadow": True}, {}).http_listen == "127.0.0.1:0"
    for taken in (":10249", "0.0.0.0:10249", ":::10249", "192.0.2.1:10249"):  # kube-proxy's ConfigMap forms
        flags = _parse(ApplierConfig, ["--node", "n", "--shadow", "--metrics-bind-address", taken])
        shadow = config.load(ApplierConfig, flags, {})
        assert shadow.http_listen == "127.0.0.1:0", taken
    assert config.load(ApplierConfig, {"node": "n", "shadow": True, "http_listen": ":9"}, {}).http_listen == ":9"
    assert config.load(PlannerServiceConfig, {}, {}).http_listen == "127.0.0.1:0"


@pytest.mark.parametrize(("given", "metrics", "health"), [
    ("0.0.0.0", "0.0.0.0:10249", "0.0.0.0:10256"),  # kube-proxy appends its default port (AppendPortIfNeeded)
    ("::", ":::10249", ":::10256"),
    ("[::1]:9999", "::1:9999", "::1:9999"),
    ("10.0.0.1:9999", "10.0.0.1:9999", "10.0.0.1:9999"),
])
def test_bind_addresses_as_kube_proxy_defaults_them(tmp_path: Path, given: str, metrics: str, health: str) -> None:
    text = KUBEADM.replace("metricsBindAddress: 127.0.0.1:10249", f'metricsBindAddress: "{given}"').replace(
        "healthzBindAddress: 127.0.0.1:10256", f'healthzBindAddress: "{given}"')
    cfg = config.load(ApplierConfig, {"config": _file(tmp_path, text)}, {})
    assert (cfg.http_listen, cfg.healthz_bind_address) == (metrics, health)
