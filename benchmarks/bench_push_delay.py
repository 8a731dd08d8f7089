"""How long, across hosts, a near-cache reader can be served data older than a write
that already returned (issue 13): the delay between the writer's call returning and the
generation bump's push reaching another host's tracking socket.

On one host that delay is negative: a commit makes two round trips (the lease bump
before COMMIT, the release bump after) and ``invalidate()`` a bump and a ``PING``, and
Redis writes the first bump's pushes into every reader socket before it answers the
second command. Across hosts the push still has its way to travel when the writer's
reply arrives, so the window is about the reader link's one-way delay minus the
writer's last round trip and a half (and, for a commit, the database's COMMIT).

What runs, for each link setting (``.venv/bin/python -m benchmarks.bench_push_delay``,
as root; writes ``results/push_delay.md``):

* three hosts, each a Linux network namespace with a veth pair to the root namespace:
  Redis (a private ``redis-server``), a writer and a reader, each a process of its own.
  A client host reaches Redis through a relay in the root namespace, which forwards the
  TCP bytes of its link;
* the link delay is ``tc qdisc ... netem delay`` on both ends of the host's veth pair
  where the kernel has netem; where it has not (``CONFIG_NET_SCH_NETEM`` unset, as on
  the VM the results were measured on), the relay holds each chunk for the link's
  one-way delay in each direction. The script says which; every row shows the delay
  measured with PINGs over the link;
* the reader holds a raw RESP3 connection with ``CLIENT TRACKING on BCAST PREFIX
  <ns>:g:`` and stamps each push with the kernel's receive time (``SO_TIMESTAMPNS``):
  the moment a near-cache hit's ``poll(0)`` would find it;
* the writer runs ormcache as an application would (near cache on, a session attached
  to a SQLite file) and stamps each round: before it, and when the call returned. A
  round is either a commit that changes a row or ``cache.invalidate(Model)``.

``CLOCK_MONOTONIC`` is one clock for every process on the machine, namespaces or not,
so the reader's and the writer's stamps compare directly. Window = first push of the
round minus the writer's return; negative means the push was in the reader's socket
before the writer's call returned (no window).

Without the privileges for namespaces, only loopback is measured, and the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from benchmarks.common import RESULTS

ROOT = Path(__file__).resolve().parent.parent
REDIS_PORT = 6390  # inside the Redis host's own namespace: nothing else listens there
RELAY_PORT = 7000
LATE_NS = 500_000  # past its due time: a relay reports the chunk as sent late
END_TAG = "__end__"  # the writer's last write; the reader stops when it sees it


# -- wire helpers (a raw RESP3 connection: nothing between the socket and the stamp) -----
def _command(*words: str | bytes) -> bytes:
    parts = [w.encode() if isinstance(w, str) else w for w in words]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Resp3:
    """A blocking RESP3 connection that hands back replies and pushes in wire order."""

    def __init__(self, host: str, port: int) -> None:
        import hiredis

        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.push_type: Any = hiredis.PushNotification

    def send(self, *words: str | bytes) -> None:
        self.sock.sendall(_command(*words))

    def next(self) -> Any:
        while True:
            item = self.reader.gets()
            if item is not False:
                return item
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("Redis closed the connection")
            self.reader.feed(data)

    def call(self, *words: str | bytes) -> Any:
        self.send(*words)
        while True:
            item = self.next()
            if not isinstance(item, self.push_type):
                return item

    def rtt_us(self, n: int = 200) -> float:
        """Median PING round trip, µs: twice the link's one-way delay, plus Redis."""
        samples = []
        for _ in range(n):
            t0 = time.monotonic_ns()
            self.call("PING")
            samples.append((time.monotonic_ns() - t0) / 1e3)
        return statistics.median(samples)


def _instrument() -> None:
    """Make a relay keep time like a link, and the reader's probe stamp like a clock,
    not like processes on a busy 2-core machine: real-time priority (other work cannot
    hold a chunk past its due time, nor leave several pushes to be read, and stamped,
    together), timers to the microsecond (not Linux's default 50 µs slack), and a GIL
    handed over at once. The code under test, the writer, runs as usual."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    sys.setswitchinterval(1e-5)


# -- role: relay (one per client link, in the root namespace) ------------------------------
Late = Callable[[int, int], None]


def _pump(src: socket.socket, dst: socket.socket, delay_ns: int, late: Late) -> None:
    """Forward src → dst, each chunk held until ``delay_ns`` after it arrived, in order;
    a chunk sent more than ``LATE_NS`` past its due time is reported to ``late``."""
    if delay_ns <= 0:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        return
    queue: deque[tuple[int, bytes]] = deque()
    ready = threading.Condition()

    def send() -> None:
        with contextlib.suppress(OSError):
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if (left := due - time.monotonic_ns()) > 0:
                    time.sleep(left / 1e9)
                dst.sendall(data)
                if (sent := time.monotonic_ns()) - due > LATE_NS:
                    late(due, sent)

    threading.Thread(target=send, daemon=True).start()
    with contextlib.suppress(OSError):
        while True:
            data = src.recv(1 << 16)
            with ready:
                queue.append((time.monotonic_ns() + delay_ns, data))
                ready.notify()
            if not data:
                return


def relay(listen: str, upstream: str, delay_ms: float, log: str) -> None:
    """Forward each connection to ``listen`` on to ``upstream``, ``delay_ms`` late each
    way; chunks the machine sent late (not the link's doing) are appended to ``log``."""
    _instrument()
    delay_ns = round(delay_ms * 1e6)
    host, port = listen.rsplit(":", 1)
    up_host, up_port = upstream.rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    lock = threading.Lock()
    out = open(log, "a", buffering=1)  # noqa: SIM115 - open while the process lives

    def late(due: int, sent: int) -> None:
        with lock:
            out.write(f"{due} {sent}\n")

    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        remote = socket.create_connection((up_host, int(up_port)))
        for s in (client, remote):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, remote), (remote, client)):
            threading.Thread(target=_pump, args=(a, b, delay_ns, late), daemon=True).start()


# -- role: reader ---------------------------------------------------------------------------
SO_TIMESTAMPNS = 35  # Linux; Python names neither it nor its control message


def _arrivals(conn: Resp3) -> Iterator[tuple[int, int, bytes]]:
    """Each chunk the socket yields, with two CLOCK_MONOTONIC stamps, ns: when the
    kernel took the packet in (the moment a near-cache hit's ``poll(0)`` would see it)
    and when ``recv`` returned here (later by this process's wake-up, which on a busy
    machine can be milliseconds)."""
    conn.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    while True:
        data, ancillary, _, _ = conn.sock.recvmsg(1 << 16, 64)
        woke = time.monotonic_ns()
        # The kernel stamps in CLOCK_REALTIME: moved onto the monotonic clock by the
        # offset read now (the clocks do not drift apart measurably within a chunk).
        offset = time.time_ns() - time.monotonic_ns()
        if not data:
            raise ConnectionError("Redis closed the tracking connection")
        arrived = woke
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = struct.unpack("qq", raw[:16])
                arrived = min(woke, sec * 10**9 + nsec - offset)
        yield arrived, woke, data


def reader(host: str, port: int, namespace: str, out: str) -> None:
    conn = Resp3(host, port)
    conn.call("HELLO", "3")
    rtt = conn.rtt_us()
    if conn.call("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", f"{namespace}:g:") != b"OK":
        raise RuntimeError("CLIENT TRACKING was refused")
    conn.sock.settimeout(None)
    _instrument()
    print("ready", flush=True)
    pushes: list[tuple[int, int]] = []
    end = f"{namespace}:g:{END_TAG}".encode()
    for arrived, woke, data in _arrivals(conn):
        conn.reader.feed(data)
        done = False
        while (item := conn.reader.gets()) is not False:
            if isinstance(item, conn.push_type) and item[0] == b"invalidate":
                if end in (item[1] or []):
                    done = True
                else:
                    pushes.append((arrived, woke))
        if done:
            break
    Path(out).write_text(json.dumps({"rtt_us": rtt, "pushes": pushes}))


# -- role: writer ---------------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class Counter(Base):
    """The row every commit changes (its table is the tag every round bumps)."""

    __tablename__ = "push_delay_counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]


def writer(
    host: str, port: int, db: str, namespace: str, rounds: int, gap_ms: float, out: str
) -> None:
    import redis
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ormcache import Cache

    engine = create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine, expire_on_commit=False)
    with Session.begin() as s:
        s.merge(Counter(id=1, n=0))
    # The near cache on (the default), as in an application: invalidate() fences.
    cache = Cache(f"redis://{host}:{port}/0", namespace=namespace)
    cache.attach(Session)
    plain = redis.Redis(host, port)
    probe = Resp3(host, port)
    rtt = probe.rtt_us()
    probe.sock.close()

    def commit() -> tuple[int, int]:
        with Session() as s:
            row = s.get(Counter, 1)
            assert row is not None
            row.n += 1
            t0 = time.monotonic_ns()
            s.commit()
            return t0, time.monotonic_ns()

    def invalidate() -> tuple[int, int]:
        t0 = time.monotonic_ns()
        if not cache.invalidate(Counter, raise_on_error=True):
            raise RuntimeError("invalidate() was not delivered")
        return t0, time.monotonic_ns()

    stamps: dict[str, list[tuple[int, int]]] = {}
    ends: dict[str, int] = {}
    for kind, call in (("commit", commit), ("invalidate", invalidate)):
        for _ in range(5):  # warm: connections made, scripts loaded
            call()
        time.sleep(gap_ms / 1e3 + 0.05)
        stamps[kind] = []
        for _ in range(rounds):
            stamps[kind].append(call())
            # Let the round's pushes arrive before the next begins, at a random phase.
            time.sleep(gap_ms / 1e3 * (1 + random.random()))
        ends[kind] = time.monotonic_ns()  # the last round's pushes are in by now
    plain.set(f"{namespace}:g:{END_TAG}", 1)
    cache.close()
    plain.close()
    engine.dispose()
    Path(out).write_text(json.dumps({"rtt_us": rtt, "rounds": stamps, "ends": ends}))


# -- orchestration --------------------------------------------------------------------------
@dataclass
class Setting:
    name: str
    netns: bool
    writer_ms: float = 0.0
    reader_ms: float = 0.0


Row = tuple[Setting, dict[str, Any]]

SETTINGS = [
    Setting("loopback, one namespace", netns=False),
    Setting("hosts, no added delay", netns=True),
    Setting("hosts, 0.1 ms each link", netns=True, writer_ms=0.1, reader_ms=0.1),
    Setting("hosts, 1 ms each link", netns=True, writer_ms=1.0, reader_ms=1.0),
    Setting("hosts, reader 5 ms, writer 0.1 ms", netns=True, writer_ms=0.1, reader_ms=5.0),
]


@dataclass
class Lab:
    """What this run made, so that every piece is removed again, whatever happens."""

    prefix: str
    tmp: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def run(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, text=True)

    def start(self, args: Sequence[str], netns: str | None = None) -> subprocess.Popen[str]:
        """Start a process (in a network namespace), remembered for the teardown."""
        full = [*(["ip", "netns", "exec", netns] if netns else []), *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{proc.args!r} did not start")

    def host(self, role: str, index: int, net: int, netem_ms: float = 0) -> tuple[str, str]:
        """A namespace joined to the root one by a veth pair: (its address, root's).
        With ``netem_ms``, each end of the pair delays what it sends by that much."""
        ns, outer, inner = f"{self.prefix}-{role}", f"{self.prefix}{role}0", f"{self.prefix}{role}1"
        mine, root = f"10.{net}.{index}.2", f"10.{net}.{index}.1"
        self.run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        self.run("ip", "link", "set", inner, "netns", ns)
        self.run("ip", "addr", "add", f"{root}/24", "dev", outer)
        self.run("ip", "link", "set", outer, "up")
        self.run("ip", "-n", ns, "addr", "add", f"{mine}/24", "dev", inner)
        self.run("ip", "-n", ns, "link", "set", inner, "up")
        self.run("ip", "-n", ns, "link", "set", "lo", "up")
        if netem_ms > 0:
            delay = ("root", "netem", "delay", f"{netem_ms * 1000:.0f}us")
            self.run("tc", "qdisc", "add", "dev", outer, *delay)
            self.run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, *delay)
        return mine, root

    def stop_processes(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def teardown(self) -> None:
        self.stop_processes()
        for ns in self.namespaces:  # takes the veth ends inside it, and so the pairs
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.namespaces.clear()
        self.links.clear()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    # The SQLite file on tmpfs: a COMMIT that waits for a disk lies between the lease's
    # push and the release's reply, and would hide a window that a faster database has.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="push-delay-", dir=shm))
    made = Lab(prefix=f"pd{os.getpid() % 100000}", tmp=tmp)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield made
    finally:
        made.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
        for s, handler in old.items():
            signal.signal(s, handler)


def probe_namespaces(prefix: str) -> tuple[str | None, bool]:
    """(None if this process can make network namespaces, else why not; whether
    ``tc ... netem`` works in one)."""
    name = f"{prefix}-probe"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except FileNotFoundError:
        return "iproute2's ip is not installed", False
    if made.returncode != 0:
        return made.stderr.strip() or "ip netns add failed", False
    try:
        netem = ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root"]
        tc = subprocess.run([*netem, "netem", "delay", "1ms"], capture_output=True)
        return None, tc.returncode == 0
    except FileNotFoundError:
        return None, False
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def free_net() -> int:
    """A 10.N.0.0/16 that no interface of this machine is in."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = random.randint(100, 250)
        if f"inet 10.{net}." not in used:
            return net
    raise RuntimeError("no free 10.N.0.0/16 for the test hosts")


def _redis(bind: str, port: int, where: Path) -> list[str]:
    """A private, memory-only redis-server (the shared one on 6379 is never touched)."""
    return [
        "redis-server",
        *("--bind", bind, "--port", str(port), "--protected-mode", "no"),
        *("--save", "", "--appendonly", "no", "--dir", str(where)),
        *("--logfile", str(where / f"redis-{port}.log")),
    ]


def measure(made: Lab, setting: Setting, rounds: int, netem: bool) -> dict[str, Any]:
    """One setting: Redis, links, reader, then the writer's rounds; the windows. The
    links' delay is netem's on each veth pair (``netem``), else the relays'."""
    me = [sys.executable, "-m", "benchmarks.bench_push_delay"]
    namespace = f"pd-{uuid.uuid4().hex[:8]}"
    db = made.tmp / f"{namespace}.db"
    reader_out, writer_out = made.tmp / "reader.json", made.tmp / "writer.json"
    late_log = made.tmp / "late.txt"
    late_log.write_text("")
    ns_r = ns_w = ns_b = None
    if setting.netns:
        net = free_net()
        r_ip, _ = made.host("r", 1, net)
        _, w_root = made.host("w", 2, net, setting.writer_ms if netem else 0)
        _, b_root = made.host("b", 3, net, setting.reader_ms if netem else 0)
        ns_r, ns_w, ns_b = (f"{made.prefix}-{h}" for h in "rwb")
        redis_addr = (r_ip, REDIS_PORT)
        # Each client host reaches Redis through its link's relay, on the root side.
        w_addr, b_addr = (w_root, RELAY_PORT), (b_root, RELAY_PORT)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            redis_addr = w_addr = b_addr = ("127.0.0.1", s.getsockname()[1])
    server = made.start(_redis(*redis_addr, made.tmp), ns_r)
    _wait_listening(server, redis_addr, ns_r)
    if setting.netns:
        upstream = f"{redis_addr[0]}:{redis_addr[1]}"
        for (host, port), ms in ((w_addr, setting.writer_ms), (b_addr, setting.reader_ms)):
            held = str(0 if netem else ms)
            relay = [*me, "relay", f"{host}:{port}", upstream, held, str(late_log)]
            made.wait_ready(made.start(relay))
    read = made.start([*me, "reader", *map(str, b_addr), namespace, str(reader_out)], ns_b)
    made.wait_ready(read)
    gap = 3.0 + 4 * (setting.reader_ms + setting.writer_ms)
    args = [*map(str, w_addr), str(db), namespace, str(rounds), str(gap), str(writer_out)]
    if made.start([*me, "writer", *args], ns_w).wait() != 0:
        raise RuntimeError("the writer failed")
    if read.wait(30) != 0:
        raise RuntimeError("the reader failed")
    made.teardown()
    late = [int(line.split()[1]) for line in late_log.read_text().splitlines()]
    return _windows(json.loads(writer_out.read_text()), json.loads(reader_out.read_text()), late)


def _wait_listening(server: subprocess.Popen[str], addr: tuple[str, int], ns: str | None) -> None:
    probe = f"import socket; socket.create_connection(({addr[0]!r}, {addr[1]}), timeout=1)"
    for _ in range(100):
        if server.poll() is not None:
            raise RuntimeError("redis-server exited at start-up")
        args = [*(["ip", "netns", "exec", ns] if ns else []), sys.executable, "-c", probe]
        if subprocess.run(args, capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start listening")


def _windows(wrote: dict[str, Any], read: dict[str, Any], late: list[int]) -> dict[str, Any]:
    """Match each round to the pushes that arrived between its start and the next
    round's; window = the first one's arrival minus the writer's return, µs. A round
    during which a relay sent a chunk late is counted, and its window also left out of
    a second maximum: there the machine stalled, not the link."""
    pushes = read["pushes"]
    per_round = {"commit": 2, "invalidate": 1}  # the lease's and the release's; the bump's
    result: dict[str, Any] = {"writer_rtt_us": wrote["rtt_us"], "reader_rtt_us": read["rtt_us"]}
    i = 0
    for kind in ("commit", "invalidate"):
        rounds = wrote["rounds"][kind]
        windows, woke, kept, odd, stalled = [], [], [], 0, 0
        for n, (start, returned) in enumerate(rounds):
            nxt = rounds[n + 1][0] if n + 1 < len(rounds) else wrote["ends"][kind]
            while i < len(pushes) and pushes[i][0] < start:
                i += 1
            mine = [p for p in pushes[i : i + per_round[kind] + 1] if p[0] < nxt]
            if len(mine) != per_round[kind]:
                odd += 1
            if not mine:
                continue
            window = (mine[0][0] - returned) / 1e3
            windows.append(window)
            woke.append((mine[0][1] - returned) / 1e3)
            if any(start <= t < nxt for t in late):
                stalled += 1
            else:
                kept.append(window)
        windows.sort()
        result[kind] = {
            "n": len(windows),
            "odd": odd,
            "median": statistics.median(windows),
            "p99": windows[min(len(windows) - 1, int(len(windows) * 0.99))],
            "max": windows[-1],
            "positive": sum(w > 0 for w in windows),
            "woke_max": max(woke),
            "stalled": stalled,
            "kept_max": max(kept, default=float("nan")),
        }
    return result


def _table(rows: list[Row]) -> list[str]:
    lines = [
        "| setting | PING RTT/2 (writer / reader) | write | median | p99 | max"
        " | rounds with a window | rounds a relay was late | max of the others"
        " | max, stamped after recv |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(us: float, sign: str = "+") -> str:
        return f"{us / 1e3:{sign}.3f} ms"

    for setting, r in rows:
        rtt = f"{ms(r['writer_rtt_us'] / 2, '')} / {ms(r['reader_rtt_us'] / 2, '')}"
        for kind in ("commit", "invalidate"):
            k = r[kind]
            cells = [setting.name, rtt, kind, ms(k["median"]), ms(k["p99"]), ms(k["max"])]
            cells += [f"{k['positive']}/{k['n']}", str(k["stalled"]), ms(k["kept_max"])]
            cells += [ms(k["woke_max"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "relay":
        relay(argv[1], argv[2], float(argv[3]), argv[4])
        return 0
    if argv and argv[0] == "reader":
        reader(argv[1], int(argv[2]), argv[3], argv[4])
        return 0
    if argv and argv[0] == "writer":
        writer(argv[1], int(argv[2]), argv[3], argv[4], int(argv[5]), float(argv[6]), argv[7])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=500, help="writes per kind and setting")
    parser.add_argument("--no-write", action="store_true", help="print only, leave results/")
    parser.add_argument("--relay", action="store_true", help="delay in the relays, not netem")
    parser.add_argument("--only", default="", help="the settings whose name has this")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with lab() as made:
        why, netem = probe_namespaces(made.prefix)
        netem = netem and not args.relay
        settings = [s for s in SETTINGS if args.only in s.name and (why is None or not s.netns)]
        if why is not None:
            print(f"network namespaces cannot be made here ({why}): loopback only", file=sys.stderr)
        else:
            print(f"link delays by {'tc netem' if netem else 'relay'}", file=sys.stderr)
        for setting in settings:
            print(f"{setting.name} ...", file=sys.stderr, flush=True)
            rows.append((setting, measure(made, setting, args.rounds, netem)))
            for line in _table(rows[-1:])[2:]:
                print(line, file=sys.stderr, flush=True)
    lines = _table(rows)
    print("\n".join(lines))
    if not args.no_write:
        _write(lines, rows, args.rounds, why, netem)
    return 0


def _write(lines: list[str], rows: list[Row], rounds: int, why: str | None, netem: bool) -> None:
    odd = sum(r[k]["odd"] for _, r in rows for k in ("commit", "invalidate"))
    by = (
        "`tc qdisc ... netem delay` on both ends of each client host's veth pair"
        if netem
        else "a relay process per client link in the root namespace, holding each chunk for "
        "the link's one-way delay in each direction (this kernel has no netem), at real-time "
        "priority"
    )
    text = [
        "# Push delay across hosts (issue 13)",
        "",
        f"`.venv/bin/python -m benchmarks.bench_push_delay --rounds {rounds}` (as root), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, a 2-core VM shared with other jobs.",
        "",
        "Hosts are network namespaces joined by veth pairs: Redis (a private `redis-server`), "
        "a writer and a reader, one process each. The writer runs ormcache as an application "
        "does (near cache on, a session attached to a SQLite file on tmpfs) and makes, per "
        "row, one round at a time: a `commit()` that changes a row (the lease bump before "
        "COMMIT, the release bump after), or `cache.invalidate(Model)` (a bump, then a PING). "
        "The reader holds a RESP3 connection with `CLIENT TRACKING on BCAST`. Link delay: "
        f"{by}. In the row with no added delay, the links' delay is the relays' own "
        "forwarding. The loopback row has none of this: all three on 127.0.0.1.",
        "",
        "Window = when the write's first push reached the reader's socket (the kernel's "
        "receive stamp, `SO_TIMESTAMPNS`), minus when the writer's call returned, on the one "
        "CLOCK_MONOTONIC every process shares. Negative: the push was there before the call "
        "returned, so no read that starts after it can be served the old entry. The last "
        "column stamps the push when the reader's `recv` returned instead: the reader's own "
        f"wake-up on a busy machine, not the network. {rounds} rounds per row; the writer "
        "pauses between rounds so that each round's pushes are matched to it alone.",
        "",
        *lines,
        "",
        f"Rounds whose push count was not the expected one (2 per commit, 1 per "
        f"invalidate): {odd}. A relay is late when it sends a chunk more than "
        f"{LATE_NS / 1e6:g} ms past its due time: the machine stalled, not the link; the "
        "maximum of the other rounds is the link's.",
        "",
        "Reading it: Redis sends the first bump's push to the reader when it sends that "
        "bump's reply to the writer; the writer then makes one more round trip (and, for a "
        "commit, the database COMMIT) before its call returns. So the window is about the "
        "reader link's one-way delay minus the writer link's one-way delay times three, "
        "minus the COMMIT: never positive when the links are alike, and never longer than "
        "the reader link's one-way delay. A reader that learns of the write from the "
        "writer's host (a reply, a message) has that message's delay subtracted as well.",
    ]
    if why is not None:
        text += ["", f"Network namespaces could not be made ({why}): loopback only."]
    (RESULTS / "push_delay.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
