"""The embedded server's configuration and port (issue 21, low items): appliers first starting at once each
rewrite the server's configuration, and a write without a lock could drop another node's static identity
for good; ``kipvs nats --port P`` came back on 4222 after a crash; ``kipvs topology apply`` ignored
KIPVS_STATE_DIR. Real nats-server processes in the test's directory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from shared.contract import topology
from shared.messaging.embedded_nats import CONFIG, EmbeddedNats, free_loopback_port
from shared.security import nats_credentials


@pytest.fixture
async def embedded(tmp_path: Path):
    server = EmbeddedNats(tmp_path / "state")
    await server.start(stable=False)
    yield server
    await server.stop()


async def _connects(server: EmbeddedNats, auth: nats_credentials.ClientAuth) -> bool:
    try:
        nc = await nats.connect(server.client_url, allow_reconnect=False, connect_timeout=3,
                                **auth.connect_options())
    except (nats.errors.Error, OSError):
        return False
    await nc.close()
    return True


async def test_a_node_identity_a_racing_write_dropped_is_written_again(embedded: EmbeddedNats) -> None:
    """What the race left behind (node-b's seed made, then a writer that had not seen it rewrote the file):
    the next add_local_applier for node-b puts its user back, instead of trusting that the seed exists."""
    await embedded.add_local_applier("node-a")
    seed_b = nats_credentials.local_applier_seed(embedded.auth_dir, "node-b")
    auth_b = await embedded.add_local_applier("node-b")
    hidden = seed_b.with_name("hidden")
    seed_b.rename(hidden)
    with embedded._config_lock():
        embedded._write_config()  # the writer that saw only node-a
    hidden.rename(seed_b)
    os.kill(embedded.process.pid, signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert not await _connects(embedded, auth_b)
    auth_b = await embedded.add_local_applier("node-b")
    assert await _connects(embedded, auth_b)


_ADD = """
import asyncio, sys
from pathlib import Path
from shared.messaging.embedded_nats import EmbeddedNats
async def main():
    server = EmbeddedNats.running_in(Path(sys.argv[1]))
    await server.add_local_applier(sys.argv[2])
asyncio.run(main())
"""


async def test_appliers_first_starting_at_once_all_keep_their_identity(embedded: EmbeddedNats) -> None:
    nodes = [f"node-{i}" for i in range(16)]
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _ADD, str(embedded.state_dir), node)
             for node in nodes]
    assert [await asyncio.wait_for(p.wait(), 60) for p in procs] == [0] * len(nodes)
    config = (embedded.state_dir / CONFIG).read_text()
    for node in nodes:
        seed = nats_credentials.local_applier_seed(embedded.auth_dir, node)
        assert nats_credentials.public_key(nats_credentials.read_seed(seed)) in config, node


async def test_the_port_given_to_kipvs_nats_is_where_it_comes_back_after_a_crash(tmp_path: Path) -> None:
    port = free_loopback_port()
    first = EmbeddedNats(tmp_path, secure=False)
    await first.start(port=port, stable=True)  # kipvs nats --port P
    first.process.kill()  # a crash: no clean stop
    await first.process.wait()
    again = EmbeddedNats(tmp_path, secure=False)
    await again.start(stable=True)  # the next service to start brings it back
    try:
        assert again.port == port
    finally:
        await again.stop()


def test_topology_apply_uses_the_embedded_server_of_kipvs_state_dir(embedded: EmbeddedNats) -> None:
    kipvs = str(Path(sys.executable).parent / "kipvs")
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "KIPVS_NATS_NKEY_FILE", "KIPVS_NATS_CA_FILE")}
    here = {**env, "KIPVS_STATE_DIR": str(embedded.state_dir)}
    done = subprocess.run([kipvs, "topology", "apply", "--node", "node-t", "--plan-feed", "consumer"],
                          capture_output=True, text=True, timeout=60, env=here)
    assert done.returncode == 0, done.stderr

    async def declared() -> str:
        admin = embedded.identity("admin")
        nc = await nats.connect(embedded.client_url, allow_reconnect=False, **admin.connect_options())
        try:
            info = await nc.jetstream().consumer_info(topology.PLAN_STREAM, topology.applier_durable("node-t"))
            return str(info.name)
        except nats.js.errors.NotFoundError:
            return ""
        finally:
            await nc.close()
    assert asyncio.run(declared()) == "applier-node-t"
    # Issue 27: on the plan feed (the appliers' default) a node has no durable; --node declared one anyway,
    # which the node's applier then deleted. Now topology follows the feed: it deletes the one left.
    done = subprocess.run([kipvs, "topology", "apply", "--node", "node-t"], capture_output=True, text=True,
                          timeout=60, env=here)
    assert done.returncode == 0, done.stderr
    assert asyncio.run(declared()) == "" and "deleted the durable an older kipvs left for node-t" in done.stderr
    nowhere = subprocess.run([kipvs, "topology", "apply"], capture_output=True, text=True, timeout=60,
                             env={**env, "KIPVS_STATE_DIR": str(embedded.state_dir / "none")})
    assert nowhere.returncode == 2 and len(nowhere.stderr.strip().splitlines()) == 1, nowhere.stderr
    assert "no embedded server runs for" in nowhere.stderr
