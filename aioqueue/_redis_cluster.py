"""Redis Cluster: ``redis+cluster://`` and ``rediss+cluster://`` URLs, the cluster clients, and
the cluster's batcher.

Why a batcher of its own: the single-node :class:`~._redis.CommandBatcher` writes a whole batch
as one raw pipeline on one connection, which a cluster cannot take (each key's slot lives on one
master). Here each stage's commands go through redis-py's :class:`RedisCluster`, which routes
every command by its key's slot, follows ``MOVED``/``ASK`` (refreshing its slot map) and, after
a failover, reconnects to the promoted replica. Order is kept: a stage's commands are cut into
runs of one slot each, and the runs go out one after the other (a single-slot stage, which is
almost every stage, is one round trip: one command, or one pipeline).

``MULTI``/``EXEC`` cannot span slots in a cluster, so a stage's transaction markers are dropped
and its commands run in order instead: a result's ``SET NX`` comes before its notices and
before the ack of its message, so a crash between them leaves the message to run again (at
least once), never a lost result. Key-less commands (``PUBLISH``) go with the run before them:
classic pub/sub reaches every node of a cluster, whichever node it was published on.

``rediss+cluster://`` is TLS on every connection to every node, failing closed like
``rediss://`` (:mod:`.tls`): the server's certificate and host name are checked against the CA
the URL or the settings name. Every node the client learns of is checked under the name the
cluster announces for it: its IP address by default, so node certificates carry IP SANs, or
the names of Redis 7's ``cluster-announce-hostname`` with ``cluster-preferred-endpoint-type
hostname``. (redis-py dials a node called ``localhost`` at 127.0.0.1, so on loopback the
certificate must name 127.0.0.1.) One function, :func:`_tls_options`, turns a
URL into redis-py's ``ssl_*`` options, and every client made here takes them from it: the
cluster client, the lease thread's blocking one, the per-master clients of ``wait_replicas``,
the result listener's connection and the delay mover's subscriber link.

The single-node path never imports this module: the choice is made once, by URL scheme.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.crc import key_slot

from ._redis import Commands, is_cluster_url, reply_or_raise
from ._redis_link import LinkSettings, tls_context
from .errors import ConfigurationError
from .tls import switch

__all__ = [
    "CLUSTER_SCHEME",
    "TLS_CLUSTER_SCHEME",
    "ClusterBatcher",
    "ClusterUrl",
    "connect_cluster",
    "is_cluster_url",
    "node_settings",
    "parse_cluster_url",
    "subscriber_connection",
    "sync_cluster",
]

CLUSTER_SCHEME = "redis+cluster"
TLS_CLUSTER_SCHEME = "rediss+cluster"

# Commands whose replies we read raw, as the single-node link does (no redis-py callbacks).
_RAW = (
    "SET",
    "GET",
    "MGET",
    "DEL",
    "LPUSH",
    "LRANGE",
    "LREM",
    "ZADD",
    "SADD",
    "SREM",
    "SMEMBERS",
    "PEXPIRE",
    "PUBLISH",
    "EVAL",
    "EVALSHA",
    "BLMOVE",
    "PING",
)
_OPTIONS = frozenset({"password", "wait_replicas", "wait_timeout_ms"})
# What rediss+cluster:// takes besides (the same names as rediss://; see .tls for the settings)
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_SWITCHES = ("ssl_cert_reqs", "ssl_check_hostname")
_TLS_OPTIONS = frozenset({*_TLS_FILES, *_TLS_SWITCHES})
# Not waited for: reads, and BLMOVE (a fetch a failover undoes leaves its message in the queue,
# to run again: never lost). Blocking commands also stay off the per-node clients.
_NO_WAIT = frozenset({"GET", "MGET", "SMEMBERS", "LRANGE", "PING", "BLMOVE"})
_IN_FLIGHT = 64
_REDIRECTS = 5
_SPLIT = frozenset({"MGET", "DEL"})
_TRANSACTION = frozenset({"MULTI", "EXEC"})
_KEYLESS = frozenset({"PUBLISH", "PING", "CONFIG"})


class ClusterUrl:
    """A parsed ``redis[s]+cluster://[user:password@]host:port[,host:port...][/0]`` URL.

    ``tls`` is redis-py's ``ssl_*`` connection options for ``rediss+cluster://`` (verification
    on unless the URL turns it off, which :func:`~.tls.with_tls` allows only with the
    ``ssl_verify=False`` setting), None for ``redis+cluster://``.
    """

    __slots__ = ("nodes", "password", "tls", "username", "wait_replicas", "wait_timeout_ms")

    def __init__(
        self,
        nodes: list[tuple[str, int]],
        username: str | None,
        password: str | None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.nodes = nodes
        self.username = username
        self.password = password
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.tls = tls

    def __repr__(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.nodes)
        tls = ", tls" if self.tls is not None else ""
        return f"ClusterUrl({hosts!r}{tls})"


def parse_cluster_url(url: str) -> ClusterUrl:
    """The seed nodes, credentials and TLS options; a cluster has only db 0, so any other db is
    refused, and so is a TLS option in a plain ``redis+cluster://`` URL (it would not be used)."""
    scheme, _, rest = url.partition("://")
    if not is_cluster_url(url):
        raise ConfigurationError(f"not a {CLUSTER_SCHEME}:// or {TLS_CLUSTER_SCHEME}:// URL")
    tls = scheme.lower() == TLS_CLUSTER_SCHEME
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in {"", "0"}:
        raise ConfigurationError("Redis Cluster has only database 0: drop the /db from the URL")
    username = password = None
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    options = _options(query, tls)
    password = options.get("password", [password])[0]
    wait_replicas = int(options.get("wait_replicas", ["0"])[0])
    wait_timeout_ms = int(options.get("wait_timeout_ms", ["1000"])[0])
    return ClusterUrl(
        _nodes(hosts),
        username,
        password,
        wait_replicas,
        wait_timeout_ms,
        _tls_options(options) if tls else None,
    )


def _tls_options(options: dict[str, list[str]]) -> dict[str, Any]:
    """redis-py's ``ssl_*`` options from a ``rediss+cluster://`` URL's query: verification
    on (CA and host name) unless the query turns it off, whatever redis-py's defaults are."""
    tls: dict[str, Any] = {name: options[name][0] for name in _TLS_FILES if name in options}
    verify_cert = switch("ssl_cert_reqs", options.get("ssl_cert_reqs", ["required"])[0])
    tls["ssl_cert_reqs"] = "required" if verify_cert else "none"
    check = switch("ssl_check_hostname", options.get("ssl_check_hostname", ["true"])[0])
    tls["ssl_check_hostname"] = check and verify_cert
    return tls


def _options(query: str, tls: bool) -> dict[str, list[str]]:
    options = parse_qs(query)
    known = _OPTIONS | _TLS_OPTIONS if tls else _OPTIONS
    unknown = set(options) - known
    if unknown & _TLS_OPTIONS:
        raise ConfigurationError(
            f"TLS option(s) {sorted(unknown & _TLS_OPTIONS)} in a {CLUSTER_SCHEME}:// URL, "
            f"which never uses TLS: use {TLS_CLUSTER_SCHEME}://"
        )
    if unknown:
        raise ConfigurationError(
            f"unknown cluster URL option(s) {sorted(unknown)} (known: {sorted(known)})"
        )
    try:
        wait_replicas = int(options.get("wait_replicas", ["0"])[0])
        wait_timeout_ms = int(options.get("wait_timeout_ms", ["1000"])[0])
    except ValueError:
        raise ConfigurationError("wait_replicas and wait_timeout_ms must be integers") from None
    if wait_replicas < 0 or wait_timeout_ms <= 0:
        raise ConfigurationError("wait_replicas must be >= 0 and wait_timeout_ms > 0")
    return options


def _nodes(hosts: str) -> list[tuple[str, int]]:
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = port, "6379"
        try:
            nodes.append((host or "127.0.0.1", int(port)))
        except ValueError:
            raise ConfigurationError(f"bad host:port {part!r} in a {CLUSTER_SCHEME} URL") from None
    if not nodes:
        raise ConfigurationError(f"a {CLUSTER_SCHEME}:// URL needs at least one host:port")
    return nodes


def connect_cluster(
    url: str,
    *,
    connect_timeout: float,
    client_name: str,
    socket_timeout: float,
    max_connections: int,
) -> RedisCluster:
    """redis-py's cluster client on the URL's seed nodes (connects lazily, on first use)."""
    parsed = parse_cluster_url(url)
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        client_name=client_name,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        max_connections=max_connections,
        protocol=2,
        **_client_tls(parsed.tls),
    )
    for command in _RAW:
        client.set_response_callback(command, _raw)
    return client


def sync_cluster(url: str, *, timeout: float) -> SyncRedisCluster:
    """The blocking cluster client, for the worker's lease thread."""
    from redis.cluster import ClusterNode as SyncClusterNode

    parsed = parse_cluster_url(url)
    return SyncRedisCluster(
        startup_nodes=[
            SyncClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in parsed.nodes
        ],
        username=parsed.username,
        password=parsed.password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        **_client_tls(parsed.tls),
    )


def _client_tls(tls: dict[str, Any] | None) -> dict[str, Any]:
    """A redis-py client's TLS keyword arguments (``ssl=True`` and the URL's ``ssl_*``)."""
    return {} if tls is None else {"ssl": True, **tls}


def _raw(response: Any, **_: Any) -> Any:
    return response


async def node_settings(client: RedisCluster) -> LinkSettings:
    """Where to open a connection of our own (a pub/sub subscriber): a live primary."""
    await client.initialize()
    node = client.get_random_primary_node()
    kwargs = node.connection_kwargs
    return LinkSettings(
        host=node.host,
        port=int(node.port),
        username=kwargs.get("username") or None,
        password=kwargs.get("password") or None,
        client_name=kwargs.get("client_name") or None,
        connect_timeout=kwargs.get("socket_connect_timeout"),
        keepalive=True,
        tls=tls_context(node.connection_class, {**kwargs, "host": node.host, "port": node.port}),
    )


def subscriber_connection(client: RedisCluster, url: str, timeout: float) -> Connection:
    """A redis-py connection (RESP2, not yet connected) to a primary, for the result listener.

    A random known primary each time, so a listener that lost its node reconnects elsewhere;
    before the client has met the cluster, one of the URL's seed nodes.
    """
    primaries = [node for node in client.get_nodes() if node.server_type == "primary"]
    parsed = parse_cluster_url(url)
    if primaries:
        node = random.choice(primaries)
        host, port = node.host, int(node.port)
    else:
        host, port = random.choice(parsed.nodes)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": parsed.username,
        "password": parsed.password,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        "protocol": 2,
    }
    if parsed.tls is not None:
        return SSLConnection(**options, **parsed.tls)
    return Connection(**options)


def _direct_client(
    cluster: RedisCluster, host: str, port: int, tls: dict[str, Any] | None
) -> Redis:
    """A client of one node, with the cluster client's credentials, timeouts and TLS."""
    default = cluster.get_default_node()
    kwargs = default.connection_kwargs if default is not None else {}
    client = Redis(
        host=host,
        port=port,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        client_name=kwargs.get("client_name"),
        socket_timeout=kwargs.get("socket_timeout"),
        socket_connect_timeout=kwargs.get("socket_connect_timeout"),
        socket_keepalive=True,
        protocol=2,
        **_client_tls(tls),
    )
    for command in _RAW:
        client.set_response_callback(command, _raw)
    return client


def _first_key(command: tuple[Any, ...]) -> Any:
    """A command's first key, or None for a key-less command."""
    name = command[0]
    if name in _KEYLESS:
        return None
    if name in {"EVAL", "EVALSHA"}:
        return None if int(command[2]) == 0 else command[3]
    return command[1]


def _slot_of(command: tuple[Any, ...]) -> int | None:
    """The slot a command's first key hashes to, or None for a key-less command."""
    key = _first_key(command)
    if key is None:
        return None
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def _runs(stack: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """The commands cut into consecutive runs of one slot each (transaction markers dropped)."""
    runs: list[list[tuple[Any, ...]]] = []
    current: int | None = None
    for command in stack:
        if command[0] in _TRANSACTION:
            continue
        slot = _slot_of(command)
        if runs and (slot is None or slot == current or current is None):
            runs[-1].append(command)
            if current is None:
                current = slot
        else:
            runs.append([command])
            current = slot
    return runs


class ClusterBatcher:
    """The cluster's stand-in for :class:`~._redis.CommandBatcher` (same ``run``/``aclose``).

    Concurrent stages do not wait for each other: redis-py's cluster client keeps a connection
    pool per node, so they go out in parallel, each in its slot order.
    """

    busy = False

    def __init__(
        self,
        client: RedisCluster,
        translate: Callable[[], contextlib.AbstractContextManager[None]],
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._translate = translate
        self._tls = tls
        self._wait = (wait_replicas, wait_timeout_ms) if wait_replicas > 0 else None
        self._direct: dict[tuple[str, int], Redis] = {}  # per master, for writes + WAIT
        # redis-py's cluster pools refuse (MaxConnectionsError) instead of waiting: stages past
        # this many in flight wait here, under the per-node pool size.
        self._slots = asyncio.Semaphore(_IN_FLIGHT)

    async def run(self, stage: Callable[[Any], object]) -> Any:
        async with self._slots:
            return await self._run(stage)

    def submit(self, stage: Callable[[Any], object]) -> asyncio.Future[Any]:
        """:meth:`CommandBatcher.submit`'s stand-in (the event stream's writes): the stage goes
        out on its own, from a task; a cluster orders nothing across stages anyway."""
        return asyncio.ensure_future(self.run(stage))

    async def _run(self, stage: Callable[[Any], object]) -> Any:
        commands = Commands()
        stage(commands)
        stack = commands.stack
        if len(stack) == 1 and stack[0][0] in _SPLIT and len(stack[0]) > 2:
            return await self._split(stack[0])
        replies: list[Any] = []
        with self._translate():
            for run in _runs(commands.stack):
                if self._wait is not None and any(c[0] not in _NO_WAIT for c in run):
                    replies.extend(await self._replicated(run, self._wait))
                    continue
                if len(run) == 1:
                    try:
                        replies.append(await self._client.execute_command(*run[0]))
                    except redis_errors.ResponseError as exc:
                        replies.append(exc)
                    continue
                pipe = self._client.pipeline()
                for command in run:
                    pipe.execute_command(*command)
                replies.extend(await pipe.execute(raise_on_error=False))
        return reply_or_raise(replies, self._translate)

    async def _replicated(self, run: list[tuple[Any, ...]], wait: tuple[int, int]) -> list[Any]:
        """The run, then ``WAIT`` on the same connection: done only once ``wait[0]`` replicas
        have it (within ``wait[1]`` ms), else the stage fails (and is not confirmed).

        Sent on a plain client of the slot's master (one connection per pipeline): redis-py's
        cluster pipeline resends a redirected command alone, and a ``WAIT`` away from its
        writes' connection would count nothing and pass. A ``MOVED``/``ASK`` reply (nothing was
        applied) refreshes the slot map and the run goes again to the new master; a lost
        connection refreshes it and fails the stage.
        """
        key = next((_first_key(c) for c in run if _slot_of(c) is not None), None)
        if key is None:
            pipe = self._client.pipeline()
            for command in run:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        for _ in range(_REDIRECTS):
            await self._client.initialize()  # a no-op once the slot map is known
            node = self._client.get_node_from_key(key)
            if node is None:  # no master for the slot yet (a failover in progress)
                await self._refresh()
                continue
            try:
                replies = await self._on_node(node.host, int(node.port), run, wait)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                # The run may have been applied with its reply lost: never sent again here (a
                # fetch sent twice would strand what the first one moved). The caller treats
                # it as a lost reply: a send is not confirmed, a fetch is reconciled.
                await self._refresh()
                raise
            moved = next(
                (
                    r
                    for r in replies
                    if isinstance(r, redis_errors.MovedError | redis_errors.AskError)
                ),
                None,
            )
            if moved is None:
                return replies
            await self._refresh()
        raise redis_errors.ConnectionError(f"slot of {key!r} still moving after {_REDIRECTS} tries")

    async def _on_node(
        self, host: str, port: int, run: list[tuple[Any, ...]], wait: tuple[int, int]
    ) -> list[Any]:
        client = self._direct.get((host, port))
        if client is None:
            client = self._direct[(host, port)] = _direct_client(
                self._client, host, port, self._tls
            )
        async with client.pipeline(transaction=False) as pipe:
            for command in run:
                pipe.execute_command(*command)
            pipe.execute_command("WAIT", wait[0], wait[1])
            *replies, acked = await pipe.execute(raise_on_error=False)
        if isinstance(acked, Exception):
            return [*replies, acked]
        if int(acked) < wait[0]:
            return [
                *replies,
                redis_errors.ConnectionError(
                    f"a write reached {int(acked)} of the {wait[0]} replica(s) wait_replicas "
                    f"asks for within {wait[1]} ms: it may be lost if its master fails now"
                ),
            ]
        return list(replies)

    async def _refresh(self) -> None:
        """Learn the cluster's slot map again (after a failover or a resharding)."""
        with contextlib.suppress(redis_errors.RedisError, OSError):
            await self._client.nodes_manager.initialize()

    async def _split(self, command: tuple[Any, ...]) -> Any:
        """MGET or DEL of keys in several slots: one command per key, replies combined."""
        name, keys = command[0], command[1:]
        with self._translate():
            pipe = self._client.pipeline()
            for key in keys:
                pipe.execute_command("GET" if name == "MGET" else "DEL", key)
            replies = await pipe.execute(raise_on_error=False)
        reply_or_raise(replies, self._translate)
        return list(replies) if name == "MGET" else sum(int(r) for r in replies)

    async def aclose(self) -> None:
        """Close the client's connections: a command blocked on one of them fails at once."""
        direct, self._direct = self._direct, {}
        for client in direct.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        with contextlib.suppress(Exception):
            await self._client.aclose()
