"""The demo's script: start the whole system on one machine, show it working, change it live, audit it.

Run by ``kipvs demo`` (services/harness/demo/main.py): inside the QEMU guest with ``--backend
netlink`` (every node a network namespace with real IPVS), or on this host with ``--backend memory``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import io
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from services.harness.guest.vm import time_scale
from services.harness.simulator import scenario as scenarios
from services.tools import why
from shared.contract import topology
from shared.messaging import bus
from shared.tools import records
from shared.tools.log_client import decode_entry, read_all

from . import network, pace
from .cluster import Cluster, workdir_for
from .network import NetworkError

SCENARIO = Path(__file__).resolve().parents[1] / "simulator" / "scenarios" / "small-cluster.yaml"
STEPS = 8


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say(f"[{n}/{STEPS}] {text}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("netlink", "memory"), required=True)
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    parser.add_argument("--stop-file", default="", help="also stop when this file appears (the host's Ctrl-C)")
    parser.add_argument("--workdir", default="", help="where logs and the NATS store go")
    parser.add_argument("--credentials", default="", help="the bus's credentials directory, made beforehand "
                                                          "(default: made in the workdir)")
    parser.add_argument("--host-link", default="", metavar="ADDRESS/PREFIX",
                        help="the guest's end of a link from the host (eth0): NATS listens there too, so tools on "
                             "the host reach the live log")
    parser.add_argument("--copy-logs-to", default="", metavar="DIR",
                        help="when a step fails, copy the services' logs here (the guest's share with the host: "
                             "the guest's own files are gone once it stops)")
    parser.add_argument("--save-log", default="", metavar="PATH|-",
                        help="write the whole log as 'kipvs tap --json' lines to PATH (-: to the console, "
                             "between markers, for the host to save)")


async def demo(args: argparse.Namespace) -> int:
    scenario = scenarios.load(str(SCENARIO))
    scenario.steps = []  # the demo makes its own changes, timed
    own_workdir = not args.workdir  # a temporary folder of ours: removed at the end unless something failed
    cluster = Cluster(workdir_for(Path(args.workdir) if args.workdir else None), args.backend, scenario,
                      host_link=args.host_link,
                      credentials=Path(args.credentials) if args.credentials else None)
    status = 1
    script = asyncio.create_task(_script(cluster, args))
    stopper = asyncio.create_task(_stop_requested(args))
    try:
        await asyncio.wait({script, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not script.done():  # Ctrl-C on the host (the stop file) or here: stop at whatever step
            kept = cluster.keeping  # the end of --keep, not an interruption
            if not kept:
                say("\nstop requested")
            script.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await script
            if args.save_log and cluster.js is not None:
                with contextlib.suppress(Exception):  # the log so far, if the bus is up
                    await _save_log(cluster, args.save_log)
            status = 0 if kept else 130
            return status
        status = script.result()
        return status
    finally:
        stopper.cancel()
        say("stopping everything ...")
        await cluster.stop()
        if status != 0 and status != 130 and args.copy_logs_to:
            _copy_logs(cluster.workdir / "logs", Path(args.copy_logs_to))
        if own_workdir and status == 0:
            shutil.rmtree(cluster.workdir, ignore_errors=True)
        elif own_workdir:
            say(f"the services' logs are kept in {cluster.workdir / 'logs'}")
        say("stopped: nothing of the demo is left running")


def _copy_logs(logs: Path, to: Path) -> None:
    """The services' logs (every file of ``logs``) into ``to``; said in one line, also when it fails."""
    try:
        shutil.copytree(logs, to, dirs_exist_ok=True)
    except OSError as exc:
        say(f"the services' logs could not be copied to {to}: {exc}")
        return
    say(f"the services' logs are copied to {to} ({', '.join(sorted(p.name for p in to.iterdir()))})")


async def _stop_requested(args: argparse.Namespace) -> None:
    """Returns when a stop is asked for: SIGINT/SIGTERM here, or the stop file appearing (the host's
    Ctrl-C), at any step of the script; with --keep the script itself then waits for it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    stop_file = Path(args.stop_file) if args.stop_file else None
    while not stop.is_set():
        if stop_file is not None and stop_file.exists():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _script(cluster: Cluster, args: argparse.Namespace) -> int:
    started = time.monotonic()
    await _start(cluster)
    await _converged(cluster, started)
    step(5, "requests through Services, from inside node-a")
    await _requests(cluster, [("ClusterIP web", "10.96.0.10", 80, 6), ("NodePort api", "192.168.50.11", 30080, 3),
                              ("ClusterIP session (ClientIP affinity)", "10.96.0.40", 80, 4),
                              ("LoadBalancer shop (eTP Local, pod on node-a)", "198.51.100.7", 80, 2)])
    await _changes(cluster)
    await _audit(cluster)
    if args.keep:
        await _keep(cluster, args)
    else:
        say(f"\ndone in {time.monotonic() - started:.0f} s. '{kipvs_command()} demo --keep' keeps it running to "
            "explore with kipvs tap / history / why / replay.")
    if args.save_log:
        await _save_log(cluster, args.save_log)
    return 0


async def _start(cluster: Cluster) -> None:
    """Steps 1-3: the bus, the Kubernetes API simulator, then every service."""
    real = cluster.backend == "netlink"
    counts = collections.Counter(o["kind"] for o in cluster.scenario.objects)
    step(1, "NATS JetStream (the event log) ...")
    await cluster.start_nats()
    say(f"      listening on {cluster.url}; store and logs in {cluster.workdir}")
    if cluster.public_url != cluster.url:
        say(f"      and on {cluster.public_url}, reachable from the host: the tools can follow the live log")
    step(2, f"Kubernetes API simulator: {counts['Node']} nodes, {counts['Service']} Services (ClusterIP, NodePort, "
            f"LoadBalancer with externalTrafficPolicy Local, session affinity), {counts['Pod']} pods")
    await cluster.start_simulator()
    if real:
        say(f"      pods are network namespaces serving HTTP on :8080, behind veths named as Calico names them; "
            f"nodes {', '.join(f'{n.name} ({n.address})' for n in cluster.nodes)} on one bridge")
    step(3, "auth callout, watcher, planner and one applier per node (TLS; an identity each) ...")
    for service in ("auth", "watcher", "planner", *(f"applier-{n}" for n in cluster.node_names())):
        await cluster.start(service)
        if service == "auth":
            await cluster.auth_listening(within=60 * time_scale())  # a first Python start under TCG is slow
        say(f"      started {service}")


async def _converged(cluster: Cluster, started: float) -> None:
    """Step 4: every node holds its plan; each node's table, facts, and node-a's Calico endpoint marks."""
    real = cluster.backend == "netlink"
    step(4, "waiting until every node holds its plan ...")
    took = await cluster.converged(within=120)
    say(f"      converged {took:.1f} s after the services started ({time.monotonic() - started:.1f} s in all)")
    for node in cluster.node_names():
        label = "ipvsadm -Ln" if real else "the plan, in ipvsadm -S form (SIMULATED kernel)"
        say(f"\n  --- {node}: {label} ---")
        say(_indent(await cluster.ipvsadm_list(node), "  "))

    if real:
        say("\n  --- each node's facts, as its applier reports them (IPVS-mode detection, live over netlink) ---")
    else:
        say("\n  --- each node's facts, as its applier reports them: SIMULATED kernels report IPVS and kube-ipvs0 "
            "as present ---")
    for node in cluster.node_names():
        facts = await read_all(cluster.js, bus.LogReader(topology.STATUS_STREAM),
                               topology.status_subject(node, "facts"))
        say(f"  {records.one_line(facts[-1]) if facts else node + ': no facts report yet'}")
    planner = await cluster.planned()
    calico = planner.node_calico("node-a")
    say("\n  --- Calico on node-a: the endpoint mark of each local pod (Felix's algorithm, kept in the log) ---")
    say(f"  endpoint mask {calico.layout.endpoint_mask:#010x}, non-Calico mark {calico.layout.non_calico:#010x}, "
        f"node ports {', '.join(f'{lo}-{hi}' for lo, hi in calico.nodeport_ranges)}")
    by_interface = {p.host_interface: p.name for p in cluster.pods.values()}
    for interface, mark in sorted(calico.endpoint_marks.items()):
        say(f"  {interface} ({by_interface.get(interface, '?')}): {mark:#010x}")


async def _changes(cluster: Cluster) -> None:
    """Steps 6 and 7: a pod deleted, then a Deployment scaled, each followed to every node's kernel."""
    real = cluster.backend == "netlink"
    step(6, "live change: pod web-2 is deleted (its endpoint leaves EndpointSlice web-x1)")
    slice_ = _slice(cluster, "web-x1")

    async def delete_web2() -> None:
        assert cluster.sim is not None
        await cluster.sim.delete("Pod", "default", "web-2")
        await cluster.sim.apply(_with_endpoints(slice_, [e for e in slice_["endpoints"]
                                                        if e["addresses"] != ["10.244.2.11"]]))

    await _live_change(cluster, delete_web2)
    if real:
        say(f"      web-2 stays in the kernels at weight 0 while its connections drain (at most "
            f"{cluster.drain_timeout:.0f} s here, --drain-timeout), as kube-proxy drains:")
        say(_indent((await network.in_node("node-a", "ipvsadm", "-L", "-n", "-t", "10.96.0.10:80"))[1], "        "))
    await cluster.remove_pod("web-2")

    step(7, "live change: Deployment web scaled to 3 (pods web-3 on node-c and web-4 on node-b become ready)")
    new_pods = [_pod("web-3", "node-c", "10.244.3.11"), _pod("web-4", "node-b", "10.244.2.12")]
    for pod in new_pods:
        await cluster.add_pod(pod)

    async def scale_web() -> None:
        assert cluster.sim is not None
        for pod in new_pods:
            await cluster.sim.apply(pod)
        endpoints = [e for e in slice_["endpoints"] if e["addresses"] != ["10.244.2.11"]]
        endpoints += [{"addresses": [p["status"]["podIP"]], "nodeName": p["spec"]["nodeName"],
                       "zone": "zone-2" if p["spec"]["nodeName"] == "node-c" else "zone-1",
                       "conditions": {"ready": True, "serving": True, "terminating": False}} for p in new_pods]
        await cluster.sim.apply(_with_endpoints(slice_, endpoints))

    await _live_change(cluster, scale_web)
    await _requests(cluster, [("ClusterIP web", "10.96.0.10", 80, 6)])


async def _audit(cluster: Cluster) -> None:
    """Step 8: why node-a forwards 10.96.0.10:80, from the log alone (``kipvs why``)."""
    step(8, "audit trail: why does node-a forward 10.96.0.10:80? (kipvs why --node node-a 10.96.0.10:80)")
    assert cluster.js is not None
    plan = await read_all(cluster.js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)
    story = why.provenance(plan, "node-a", ("TCP", "10.96.0.10", 80))
    explainer = why.Explainer(await read_all(cluster.js, bus.LogReader(topology.KUBE_STREAM)),
                              await read_all(cluster.js, bus.LogReader(topology.STATUS_STREAM),
                                             "kipvs.status.node-a.applied"))
    out = io.StringIO()
    why.print_text(why.render(story, explainer), out)
    say(_indent(out.getvalue(), "  "))


LOG_BEGIN, LOG_END = "=====KIPVS-DEMO-LOG-BEGIN=====", "=====KIPVS-DEMO-LOG-END====="


async def _save_log(cluster: Cluster, where: str) -> None:
    """The whole log, every stream, as ``kipvs tap --json`` lines: every tool reads it with ``--log``."""
    assert cluster.js is not None
    lines = [records.as_json(entry) for stream in (topology.KUBE_STREAM, topology.PLAN_STREAM,
                                                   topology.STATUS_STREAM, topology.PARKED_STREAM)
             for entry in await read_all(cluster.js, bus.LogReader(stream))]
    if where == "-":
        say(LOG_BEGIN)
        for line in lines:
            say(line)
        say(LOG_END)
    else:
        Path(where).write_text("\n".join(lines) + "\n")  # noqa: ASYNC240 - once, at the end


async def _requests(cluster: Cluster, targets: list[tuple[str, str, int, int]]) -> None:
    real = cluster.backend == "netlink"
    if not real:
        say("      SIMULATED kernel: no packets flow. By the plan, these real servers would answer:")
    planner = await cluster.planned()
    state = cluster.node_state(planner, "node-a")
    for label, ip, port, count in targets:
        if real:
            answers = await cluster.requests("node-a", ip, port, count)
            tally = ", ".join(f"{who}: {n}" for who, n in sorted(collections.Counter(answers).items()))
            say(f"      {label} {ip}:{port} x{count} -> {tally}")
        else:
            vs = state.ipvs.get(("TCP", ip, port))
            reals = ", ".join(f"{r[0]}:{r[1]}" for r in sorted(vs.reals)) if vs else "none"
            say(f"      {label} {ip}:{port} -> {reals}")


async def _live_change(cluster: Cluster, change: Any) -> None:
    """Make a change in the Kubernetes API, then show the records it caused and the time to each node."""
    assert cluster.js is not None
    kube_before = await _last(cluster, topology.KUBE_STREAM)
    plan_before = await _last(cluster, topology.PLAN_STREAM)
    t0 = time.time_ns()
    await change()
    await cluster.converged(within=60)
    planner = await cluster.planned()
    say("      the records it caused (kipvs tap):")
    for stream, after in ((topology.KUBE_STREAM, kube_before), (topology.PLAN_STREAM, plan_before)):
        # only what the change caused
        async for msg in bus.read_stream(cluster.js, bus.LogReader(stream), start_seq=after + 1):
            say(f"        {records.one_line(decode_entry(stream, msg))}")
    timings = []
    for node in cluster.node_names():
        applied = next((t for t, r in await cluster.report_entries(node) if r.plan_seq >= planner.seq), None)
        timings.append(f"{node} {(applied - t0) / 1e6:.0f} ms" if applied else f"{node} ?")
    what = "kernel" if cluster.backend == "netlink" else "SIMULATED kernel"
    say(f"      from the Kubernetes change to the {what} (apply reports; tables checked): {', '.join(timings)}")


def kipvs_command() -> str:
    """How the reader of the demo runs kipvs from another terminal: ``kipvs`` when the one on PATH is this
    installation's, else the ``kipvs`` beside this Python (a checkout's ``.venv/bin/kipvs``), relative to the
    working folder when inside it."""
    beside = Path(sys.executable).with_name("kipvs")
    on_path = shutil.which("kipvs")
    if not beside.exists() or (on_path and Path(on_path).resolve() == beside.resolve()):
        return "kipvs"
    try:
        return str(beside.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(beside.absolute())


async def _last(cluster: Cluster, stream: str) -> int:
    assert cluster.js is not None
    return (await cluster.js.stream_info(stream)).state.last_seq


async def _keep(cluster: Cluster, args: argparse.Namespace) -> None:
    url = cluster.public_url
    say(f"\neverything keeps running. Explore from another terminal ({kipvs_command()}), as the read-only tools "
        "identity:")
    say(f"  export NATS_URL={url} KIPVS_NATS_NKEY_FILE={cluster.auth_dir / 'tools.nk'} "
        f"KIPVS_NATS_CA_FILE={cluster.auth_dir / 'ca.pem'}")
    say("  kipvs tap --since 1h          # the whole log, then live")
    say("  kipvs why --node node-b 10.96.0.10:80")
    say("  kipvs history EndpointSlice/default/web-x1")
    say("  kipvs replay                   # re-plan the log, diff with what was published")
    say("  kipvs plan --node node-c --at 20")
    if cluster.backend == "netlink" and url == cluster.url:
        say("  (no link from the host into the guest: these work inside it only; the log is saved when it stops)")
    say("Ctrl-C stops everything.")
    cluster.keeping = True
    await asyncio.Event().wait()  # until the stop request (see _stop_requested) cancels the script


def _slice(cluster: Cluster, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(o for o in cluster.scenario.objects
                              if o["kind"] == "EndpointSlice" and o["metadata"]["name"] == name))


def _with_endpoints(slice_: dict[str, Any], endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {**slice_, "endpoints": endpoints}


def _pod(name: str, node: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                            "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "web"}]},
            "status": {"phase": "Running", "podIP": ip}}


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.harness.demo.run")
    add_arguments(parser)
    args = parser.parse_args(argv)
    scale = pace.calibrate()
    if scale > 1.0:
        say(f"kipvs demo: waits stretched x{scale:.1f} to this machine's pace (emulation or load)")
    try:
        return asyncio.run(demo(args))
    except KeyboardInterrupt:
        return 130
    except (TimeoutError, NetworkError) as exc:
        say(f"kipvs demo: {exc or type(exc).__name__}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
