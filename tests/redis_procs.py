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


class ClusterSetup:
    """Three primaries, slots split evenly, no replicas."""

    def __init__(self, tmp: Path) -> None:
        self.nodes = [
            PrivateRedis(
                str(tmp / f"node{i}"),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                bus=True,
            )
            for i in range(3)
        ]

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
