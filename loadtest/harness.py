"""Real processes for load runs and end-to-end tests: the service, a Redis server, worlds.

Nothing is mocked: the service runs as ``python -m service`` in its own process (the command
the README and the Dockerfile use) and is driven over HTTP. Used by :mod:`loadtest.capacity`
and by the tests that need a live service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
T0 = 1.7e9
"""Histories of generated worlds start here (unix seconds, Nov 2023)."""


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or an assertion error saying how to install it (never a skip)."""
    path = shutil.which(name)
    assert path is not None, (
        f"{name} not found on PATH: install the Debian package {package!r} "
        f"(apt-get install -y {package}); CI installs it with scripts/install-system-deps.sh"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until it holds; fail early (with the log's tail) if ``process`` exits."""

    def tail() -> str:
        return log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}\n{tail()}")
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s\n{tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def post_json(url: str, body: object, timeout: float = 30) -> object:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def put_items(url: str, items: Mapping[int, Mapping[str, int | None]], batch: int = 1000) -> int:
    """``PUT /items`` the given items (id -> raw attributes) in batches of ``batch`` (the
    service's default max_items_per_put); returns the items the service upserted. Writes are
    open without a token on loopback, which is where the harness starts the service."""
    ids = list(items)
    upserted = 0
    for start in range(0, len(ids), batch):
        body = {
            "items": [
                {"item_id": i, "attributes": dict(items[i])} for i in ids[start : start + batch]
            ]
        }
        request = urllib.request.Request(
            f"{url}/items",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            upserted += int(json.loads(response.read())["upserted"])
    return upserted


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A temporary copy of this repository's tree at ``revision`` (``git archive``), for running
    another revision's service beside this one (:func:`running_service`'s ``root``)."""
    tree = subprocess.run(
        ["git", "archive", "--format=tar", revision], cwd=REPO_ROOT, check=True,
        capture_output=True,
    ).stdout  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ifa-checkout-") as scratch:
        subprocess.run(["tar", "-x", "-C", scratch], input=tree, check=True)
        yield Path(scratch)


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL: a graceful stop lets uvicorn run the lifespan shutdown."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _start_redis(
    port: int,
    directory: Path,
    *options: str,
    listen: Sequence[str] = (),
    tls_ca: Path | None = None,
) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:``port`` writing its log (and any files) in ``directory``;
    ``listen`` replaces the plain ``--port`` (a TLS-only server), ``tls_ca`` is what the
    readiness ping trusts."""
    binary = require_binary("redis-server", "redis-server")
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", *(listen or ("--port", str(port))), "--save", "",
         "--dir", str(directory), "--logfile", str(log), *options],
    )  # fmt: skip
    wait_until(lambda: redis_pings(port, tls_ca), 10, f"redis-server on port {port}", process, log)
    return process


def redis_pings(port: int, tls_ca: Path | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as plain:
            s = plain
            if tls_ca is not None:
                s = ssl.create_default_context(cafile=str(tls_ca)).wrap_socket(
                    plain, server_hostname="127.0.0.1"
                )
            s.sendall(b"PING\r\n")
            # NOAUTH: up, and asking for the password it was started with.
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with openssl; the certificate is its own CA."""
    openssl = require_binary("openssl", "openssl")
    cert, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class RedisProcess:
    """A private redis-server that a fault test may kill, pause and restart on the same port and
    data directory (with AOF on, acknowledged writes survive the kill)."""

    directory: Path
    port: int
    aof: bool
    appendfsync: str
    password: str | None = None
    tls: bool = False
    """Serve TLS only (self-signed certificate in ``directory``; the URL names it as the CA)."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            ca = self.directory / "tls-cert.pem"
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", self.appendfsync]
            if self.aof
            else ["--appendonly", "no"]
        )
        auth = ["--requirepass", self.password] if self.password else []
        listen: list[str] = []
        ca: Path | None = None
        if self.tls:
            ca, key = self_signed_certificate(self.directory)
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(ca),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                      "--tls-auth-clients", "no"]  # fmt: skip
        self.process = _start_redis(
            self.port, self.directory, *persistence, *auth, listen=listen, tls_ca=ca
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync; what survives is what the AOF already had."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a slow Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            stop(self.process)


@contextmanager
def redis_process(
    directory: Path,
    aof: bool = False,
    appendfsync: str = "everysec",
    password: str | None = None,
    tls: bool = False,
) -> Iterator[RedisProcess]:
    """A private redis-server on a free port (AOF with ``appendfsync`` when ``aof``, requiring
    ``password`` when given, TLS only when ``tls``); stopped on exit whatever state the test left
    it in."""
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisProcess(directory, free_port(), aof, appendfsync, password, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A private, non-persistent redis-server on a free port; yields its URL."""
    with redis_process(directory) as server:
        yield server.url


@dataclass
class ClusterNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    bus: tuple[str, ...]


@dataclass
class LocalCluster:
    """A Redis Cluster of local masters (no replicas); any node's URL reaches all of it."""

    nodes: list[ClusterNode]
    options: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def kill(self, index: int) -> None:
        """SIGKILL one master: no shutdown, no final AOF rewrite, like a crashed host."""
        process = self.nodes[index].process
        process.kill()
        process.wait(10)

    def restart(self, index: int) -> None:
        """Start a killed node again on its port and directory (nodes.conf, AOF) and wait
        until the whole cluster agrees it is healthy."""
        node = self.nodes[index]
        node.process = _start_redis(node.port, node.directory, *self.options, *node.bus)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until(
            lambda: all(_cluster_ok(node.port) for node in self.nodes), timeout, "redis cluster"
        )


def _cluster_ok(port: int) -> bool:
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
        try:
            info = client.cluster("info")
        finally:
            client.close()
    except redis.RedisError:
        return False
    return bool(info.get("cluster_state") == "ok")


@contextmanager
def redis_cluster(
    directory: Path, masters: int = 3, durable: bool = False
) -> Iterator[LocalCluster]:
    """``masters`` cluster-enabled redis-servers on free ports, joined by
    ``redis-cli --cluster create``; stopped on exit.

    ``durable`` turns on the append-only file with an fsync per write, so that a node killed
    and restarted from its directory has every write it acknowledged. A node that is down does
    not stop the others from serving their slots (``cluster-require-full-coverage no``).
    """
    cli = require_binary("redis-cli", "redis-server")
    options = (
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
        *(("--appendonly", "yes", "--appendfsync", "always") if durable else
          ("--appendonly", "no")),
    )  # fmt: skip
    nodes: list[ClusterNode] = []
    try:
        for i in range(masters):
            port = free_port()
            node_dir = directory / f"node-{i}"
            shutil.rmtree(node_dir, ignore_errors=True)  # a node must start empty to join
            # The cluster bus port is chosen too: port + 10000 may be taken or out of range.
            bus = ("--cluster-port", str(free_port()))
            process = _start_redis(port, node_dir, *options, *bus)
            nodes.append(ClusterNode(port, node_dir, process, bus))
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            output = created.stdout + created.stderr
            raise RuntimeError(f"redis-cli --cluster create failed\n{output}")
        cluster = LocalCluster(nodes, options)
        cluster.wait_healthy()
        yield cluster
    finally:
        for node in nodes:
            stop(node.process)


@dataclass(frozen=True)
class LiveService:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def running_service(
    model_dir: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    args: Sequence[str] = (),
    root: Path = REPO_ROOT,
) -> Iterator[LiveService]:
    """``python -m service`` on a free port of 127.0.0.1 until ``/readyz`` answers 200.

    ``env`` gives the ``IFA_*`` settings (inherited ``IFA_*`` and ``REDIS_URL`` are dropped, so the
    service runs with what the caller asked for and nothing else) and ``args`` extra command-line
    flags; the process is stopped on exit. ``root`` is the source tree it runs from (another
    revision's checkout, for a side-by-side benchmark). Start-up includes seeding the store when
    ``IFA_SEED_WORLD`` is set, hence the generous default timeout.
    """
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
               "--model-dir", str(model_dir), *args]  # fmt: skip
    # REDIS_URL too: alone it selects the Redis store, and the caller's env says which store.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith("IFA_") and k != "REDIS_URL"
    }
    if root != REPO_ROOT:
        inherited["PYTHONPATH"] = str(root)  # not this checkout's modules
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=inherited | dict(env or {}),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/readyz"), timeout, "python -m service", process, log)
        yield LiveService(url, process, log)
    finally:
        stop(process)


def warm_state_cache(
    url: str,
    user_ids: Sequence[int],
    candidate_ids: Sequence[int] | Callable[[], Sequence[int]],
) -> None:
    """Rank every user once, so that each has a cached state before latency is measured.

    ``candidate_ids`` is the set every user is ranked with, or draws one set per user (the load's
    own mix, so that the workers' item caches hold what the steady state will ask for)."""
    for user_id in user_ids:
        candidates = candidate_ids() if callable(candidate_ids) else candidate_ids
        post_json(f"{url}/rank", {"user_id": user_id, "candidate_ids": list(candidates), "k": 1})


def write_world(
    directory: Path,
    item_ids: np.ndarray,
    n_users: int,
    events_per_user: int,
    seed: int = 0,
) -> Path:
    """A load-test world: ``items``, ``users`` and ``events`` parquet in :mod:`model.data`'s layout.

    Every user gets exactly ``events_per_user`` events over the given items (a history of known
    length, which is what latency depends on), timestamps strictly increasing over ~35 days.
    Items get random category and author columns; a catalogue of the model, not these, decides
    what the service knows.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    pq.write_table(
        pa.table({
            "item_id": item_ids,
            "category": rng.integers(0, 8, item_ids.size),
            "author": rng.integers(0, 50, item_ids.size),
            "topic": rng.integers(0, 12, item_ids.size),
        }),
        directory / "items.parquet",
    )  # fmt: skip
    user_ids = np.arange(n_users, dtype=np.int64)
    pq.write_table(
        pa.table({
            "user_id": user_ids,
            "age_group": rng.integers(0, 8, n_users),
            "gender": rng.integers(0, 3, n_users),
            "region": rng.integers(0, 32, n_users),
        }),
        directory / "users.parquet",
    )  # fmt: skip
    n_events = n_users * events_per_user
    # Increasing per user: cumulative sums of positive gaps (mean 5 minutes).
    gaps = rng.exponential(300.0, (n_users, events_per_user)) + 1e-3
    pq.write_table(
        pa.table({
            "user_id": np.repeat(user_ids, events_per_user),
            "item_id": rng.choice(item_ids, n_events),
            "action": rng.choice(4, n_events, p=[0.7, 0.2, 0.07, 0.03]).astype(np.int8),
            "timestamp": T0 + np.cumsum(gaps, axis=1).ravel(),
        }),
        directory / "events.parquet",
    )  # fmt: skip
    return directory
