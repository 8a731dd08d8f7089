"""redis-server processes of a test's own, on free ports: a plain server to kill, a
Sentinel setup (master, replica, Sentinel), a three-node Cluster. They are stopped by pid;
the shared server on 6379 is never touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.net import free_port


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; these tests start their own servers")
    return binary


def _wait(what: str, ready: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():  # type: ignore[operator]
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


class PrivateRedis:
    """A redis-server of the test's own, on a free port; never the shared one."""

    def __init__(self, tmp: str, *extra: str, bus: bool = False) -> None:
        self.extra = extra
        self.port = free_port(bus=bus)
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        Path(self.tmp).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                _binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            _wait(f"redis-server on port {self.port}", client.ping)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def tls_redis(tmp: str) -> tuple[PrivateRedis, str]:
    """A private server that also speaks TLS, and the ``rediss://`` URL of its TLS port.

    Its certificate is self-signed for 127.0.0.1 (made by ``openssl``, which a Redis
    built with TLS needs anyway); the URL names it as the CA. The plain port stays open
    for the test's own administration (``client()``, ``CLIENT KILL``)."""
    Path(tmp).mkdir(parents=True, exist_ok=True)
    cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed; the TLS tests make their own certificate")
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    tls_port = free_port()
    server = PrivateRedis(
        tmp,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        cert,
        "--tls-key-file",
        key,
        "--tls-ca-cert-file",
        cert,
        "--tls-auth-clients",
        "no",
    )
    return server, f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"


class SentinelSetup:
    """A master, one replica and one Sentinel (quorum 1) that fails over within about
    a second of the master going down."""

    SERVICE = "ormcache-test"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.master = PrivateRedis(str(tmp / "master"))
        self.replica = PrivateRedis(str(tmp / "replica"))
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    def url(self, query: str = "") -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0{query}"

    def start(self) -> None:
        self.master.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        replica = self.replica.client()
        _wait(
            "replication",
            lambda: replica.info("replication").get("master_link_status") == "up",
        )
        replica.close()
        conf = self.tmp / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.tmp}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 400\n"
            f"sentinel failover-timeout {self.SERVICE} 2000\n"
        )
        self.sentinel = subprocess.Popen(
            [_binary(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.sentinel_port)
        _wait(
            "Sentinel",
            lambda: client.execute_command("SENTINEL", "REPLICAS", self.SERVICE),
        )
        client.close()

    def current_master_port(self) -> int:
        client = redis.Redis(port=self.sentinel_port, decode_responses=True)
        try:
            _host, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
            )
            return int(port)
        finally:
            client.close()

    def stop(self) -> None:
        if self.sentinel is not None:
            os.kill(self.sentinel.pid, signal.SIGKILL)
            self.sentinel.wait()
            self.sentinel = None
        self.replica.kill()
        self.master.kill()


def _cluster_node(tmp: Path) -> PrivateRedis:
    return PrivateRedis(
        str(tmp),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
        bus=True,
    )


def raw(node: PrivateRedis, *args: object) -> Any:
    """One command on a fresh connection to ``node``, its reply unparsed."""
    conn = redis.Connection(port=node.port)
    try:
        conn.send_command(*args)
        return conn.read_response()
    finally:
        conn.disconnect()


class ClusterSetup:
    """Three primaries, slots split evenly, no replicas; nodes can be added (as empty
    primaries or as replicas), slots moved and replicas promoted."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nodes = [_cluster_node(tmp / f"node{i}") for i in range(3)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed; the Cluster tests need it")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for node in self.nodes:
            client = node.client()
            _wait(
                f"cluster node {node.port}",
                lambda c=client: c.cluster("info")["cluster_state"] == "ok",  # type: ignore[misc]
            )
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    # -- reshaping (each step waits until every node agrees) ------------------------------
    def _views_agree(self) -> bool:
        """Every node answers ``cluster_state:ok`` and lists the same nodes with the same
        roles and slots (no node failing or still in the handshake)."""
        views = set()
        for node in self.nodes:
            if b"cluster_state:ok" not in raw(node, "CLUSTER", "INFO"):
                return False
            rows = []
            for line in raw(node, "CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                flags = set(fields[2].split(",")) - {"myself"}
                if flags & {"fail", "fail?", "handshake", "noaddr"}:
                    return False
                slots = [f for f in fields[8:] if not f.startswith("[")]
                rows.append((fields[0], ",".join(sorted(flags)), fields[3], *slots))
            views.add(tuple(sorted(rows)))
        return len(views) == 1

    def settle(self) -> None:
        _wait("the cluster to agree on its topology", self._views_agree, timeout=30)

    def node_id(self, node: PrivateRedis) -> str:
        return raw(node, "CLUSTER", "MYID").decode()

    def slot(self, key: bytes) -> int:
        return int(raw(self.nodes[0], "CLUSTER", "KEYSLOT", key))

    def owner(self, key: bytes) -> PrivateRedis:
        """The primary serving ``key``'s slot."""
        slot = self.slot(key)
        for lo, hi, primary, *_replicas in raw(self.nodes[0], "CLUSTER", "SLOTS"):
            if lo <= slot <= hi:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise AssertionError(f"no primary serves slot {slot}")

    def add_node(self, name: str) -> PrivateRedis:
        """Start a node and join it to the cluster as a primary without slots."""
        node = _cluster_node(self.tmp / name)
        node.start()
        raw(self.nodes[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
        self.nodes.append(node)
        self.settle()
        return node

    def move_slot(self, slot: int, source: PrivateRedis, target: PrivateRedis) -> None:
        """Migrate ``slot`` with its keys from ``source`` to ``target``."""
        source_id, target_id = self.node_id(source), self.node_id(target)
        src, dst = source.client(), target.client()
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            # The target first, then the source: neither ever points at the other.
            for node in sorted(self.nodes, key=lambda n: (n is not target, n is not source)):
                raw(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        finally:
            src.close()
            dst.close()
        self.settle()

    def promote(self, primary: PrivateRedis, name: str) -> PrivateRedis:
        """Add a replica of ``primary``, then fail over to it (``CLUSTER FAILOVER``): the
        replica becomes the primary of those slots, the old primary its replica."""
        replica = self.add_node(name)
        client = replica.client()
        try:
            client.execute_command("CLUSTER", "REPLICATE", self.node_id(primary))
            _wait(
                "the replica to sync",
                lambda: client.info("replication").get("master_link_status") == "up",
                timeout=20,
            )
            client.execute_command("CLUSTER", "FAILOVER")
            _wait(
                "the failover",
                lambda: client.execute_command("ROLE")[0] == b"master",
                timeout=20,
            )
        finally:
            client.close()
        self.settle()
        return replica
