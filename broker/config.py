"""Typed view of the daemon's TOML configuration.

Layers, lowest first: the defaults declared here (mirrored, with comments,
in ``config/broker.toml``), the operator's file, then environment variables
named ``BROKER__<SECTION>__<KEY>``, or ``BROKER__<SECTION>__<TABLE>__<KEY>``
for a key of a nested table (``BROKER__SYSTEMS__ERP_CLOUD__PASSWORD``).
Components receive the frozen section they need as an argument; nothing
below this module reads files or the environment.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec
from msgspec import Meta

from broker.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "config_file",
    "split_url",
    "Section",
    "DaemonConfig",
    "AmqpConfig",
    "AuthMechanism",
    "PostgresConfig",
    "SqliteConfig",
    "Synchronous",
    "TopologyConfig",
    "CoreConfig",
    "ControlConfig",
    "HttpConfig",
    "LoggingConfig",
    "TestingConfig",
    "Config",
    "load_config",
    "read_toml",
]

ENV_PREFIX = "BROKER__"

Seconds = Annotated[float, Meta(gt=0)]
#: How the daemon logs in to RabbitMQ (see ``[amqp] auth-mechanism``).
AuthMechanism = Literal["plain", "external"]
PositiveInt = Annotated[int, Meta(ge=1)]
#: SQLite's ``synchronous`` for the embedded mode's files.
Synchronous = Literal["full", "normal"]


class Section(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,  # a typo is an error, not a silent default
    rename="kebab",  # reconnect_interval_s <-> reconnect-interval-s
):
    """Base for every section of the configuration."""


class DaemonConfig(Section, frozen=True):
    """``[daemon]``: identity, which transport and store, the application tree."""

    name: str = "q2c-broker"
    transport: Literal["memory", "amqp"] = "memory"
    store: Literal["sqlite", "postgres"] = "sqlite"
    tree: str = "actors.tree:build_tree"
    demo: str = "actors.q2c_demo:run_demo"
    shutdown_s: Seconds = 30.0


class AmqpConfig(Section, frozen=True):
    """``[amqp]``: the RabbitMQ connections, publisher and consumer limits."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    heartbeat_s: Annotated[int, Meta(ge=0, le=600)] = 10
    prefetch: Annotated[int, Meta(ge=1, le=65_535)] = 1000
    publish_timeout_s: Seconds = 10.0
    confirm_window: Annotated[int, Meta(ge=1, le=65_535)] = 2048
    connect_timeout_s: Seconds = 10.0
    reconnect_interval_s: Seconds = 1.0
    reconnect_max_s: Seconds = 15.0
    management_url: str = "http://127.0.0.1:15672"
    #: amqps:// only: CA bundle (PEM) for the broker's certificate; "" uses
    #: the system's trust store.
    tls_ca_file: str = ""
    #: amqps:// only: client certificate and key (PEM), for brokers that
    #: require one (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: How the daemon logs in: "plain" with the URL's user and password, or
    #: "external" with its client certificate (SASL EXTERNAL, amqps:// and
    #: tls-cert-file required); the URL's credentials then serve only the
    #: management API.
    auth_mechanism: AuthMechanism = "plain"


class PostgresConfig(Section, frozen=True):
    """``[postgres]``: the store's pool and timeouts."""

    dsn: str = "postgresql://postgres@127.0.0.1:5432/q2c"
    pool_min_size: Annotated[int, Meta(ge=0)] = 2
    pool_max_size: PositiveInt = 8
    command_timeout_s: Seconds = 10.0
    acquire_timeout_s: Seconds = 10.0
    application_name: str = "q2c-broker"
    #: Apply pending migrations at start. False for a daemon role without DDL
    #: rights: the schema's owner runs ``brokerd migrate``, and the daemon
    #: refuses to start while a migration is pending.
    migrate: bool = True


class SqliteConfig(Section, frozen=True):
    """``[sqlite]``: the embedded store."""

    path: str = "var/q2c.sqlite3"
    #: ``full``: a commit is on disk when it returns (it survives the machine
    #: losing power); ``normal``: it survives the process dying only.
    synchronous: Synchronous = "full"


class MemoryConfig(Section, frozen=True):
    """``[memory]``: the in-process transport of the embedded mode."""

    #: The file its queues are kept in, so that a restart delivers them
    #: again; ``""`` keeps them in memory only (lost when the daemon stops).
    journal: str = "var/q2c.queues.sqlite3"
    #: As ``[sqlite] synchronous``, for the journal's writes: with ``normal``
    #: a power loss can take back publishes already confirmed.
    synchronous: Synchronous = "full"


class TopologyConfig(Section, frozen=True):
    """``[topology]``: what the daemon declares on RabbitMQ (all names ``q2c.*``)."""

    declare: bool = True
    shards: Annotated[int, Meta(ge=1, le=256)] = 4
    retry_tiers_s: tuple[Seconds, ...] = (5.0, 60.0, 600.0)
    queue_max_length: PositiveInt = 2_000_000
    delivery_limit: PositiveInt = 20
    systems: tuple[str, ...] = ()
    #: Queues for downstream readers: queue name -> event types bound to it.
    event_queues: dict[str, tuple[str, ...]] = {}
    apply_policies: bool = True


class CoreConfig(Section, frozen=True):
    """``[core]``: batching, limits, retries and the outbox relay."""

    batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 1000
    batch_linger_s: Annotated[float, Meta(ge=0, le=1)] = 0.005
    commit_writers: Annotated[int, Meta(ge=1, le=64)] = 2
    max_message_bytes: PositiveInt = 1_048_576
    #: Of a message over ``max-message-bytes``, how many bytes its dead
    #: letter keeps: up to this, all of them; past it (a hostile 100 MiB
    #: body), the AMQP consumer keeps this many and counts the rest off
    #: unbuffered, and the dead letter says it was cut.
    max_dead_letter_bytes: PositiveInt = 16 * 1_048_576
    max_attempts: PositiveInt = 5
    #: A command that fails only because its system is unavailable (down,
    #: throttling, not answering, refusing our credentials) is retried at the
    #: longest tier without using up ``max-attempts``, for this long after its
    #: first such failure; then it is dead-lettered (``unavailable_too_long``).
    unavailable_max_s: Seconds = 7 * 86_400.0
    commit_deadline_s: Seconds = 60.0
    relay_batch: PositiveInt = 1000
    relay_workers: Annotated[int, Meta(ge=1, le=256)] = 8
    relay_poll_s: Seconds = 1.0
    outbox_lease_s: Seconds = 30.0
    inbox_retention_days: PositiveInt = 7
    #: Days a finished workflow instance is kept after its last change
    #: (`broker.workflow.finished_test`); 0 keeps them all.
    finished_retention_days: Annotated[int, Meta(ge=0)] = 90

    def __post_init__(self) -> None:
        if self.max_dead_letter_bytes < self.max_message_bytes:
            raise ValueError(
                "max-dead-letter-bytes must be at least max-message-bytes "
                f"({self.max_message_bytes})"
            )


class ControlConfig(Section, frozen=True):
    """``[control]``: where the admin socket listens and who may use it."""

    socket_path: str = "var/brokerd.sock"
    #: Uids served besides the daemon's own and root.
    allowed_uids: tuple[Annotated[int, Meta(ge=0)], ...] = ()
    #: A group (name or gid) to give the socket, 0660, and to let through its
    #: directory, so that the uids of ``allowed-uids`` in it can connect; ""
    #: keeps the socket 0600 (the daemon's user and root only).
    socket_group: str | Annotated[int, Meta(ge=0)] = ""
    max_request_bytes: PositiveInt = 65_536


class HttpConfig(Section, frozen=True):
    """``[http]``: webhook ingress, the process API, health and metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0 picks a free port; the bound one is logged and in `Runtime.http_url`.
    port: Annotated[int, Meta(ge=0, le=65_535)] = 8080
    max_body_bytes: PositiveInt = 1_048_576
    #: Webhook requests handled at once; more are answered 429 at once.
    max_inflight: PositiveInt = 64
    retry_after_s: Seconds = 5.0
    publish_timeout_s: Seconds = 10.0
    #: A body not fully received this long after the headers: 408.
    body_timeout_s: Seconds = 15.0
    keepalive_timeout_s: Seconds = 75.0
    #: Bearer tokens the process API accepts; none: the API is open.
    api_tokens: tuple[Annotated[str, Meta(min_length=16)], ...] = ()
    api_max_inflight: PositiveInt = 32


class LoggingConfig(Section, frozen=True):
    """``[logging]``: level and rendering."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class TestingConfig(Section, frozen=True):
    """``[testing]``: fault injection for the crash tests; leave empty in production."""

    crash_at: str = ""
    crash_after: Annotated[int, Meta(ge=0)] = 0


class Config(Section, frozen=True):
    """The whole configuration; build it with `load_config`."""

    daemon: DaemonConfig = DaemonConfig()
    amqp: AmqpConfig = AmqpConfig()
    postgres: PostgresConfig = PostgresConfig()
    sqlite: SqliteConfig = SqliteConfig()
    memory: MemoryConfig = MemoryConfig()
    topology: TopologyConfig = TopologyConfig()
    core: CoreConfig = CoreConfig()
    control: ControlConfig = ControlConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    testing: TestingConfig = TestingConfig()
    systems: dict[str, dict[str, Any]] = {}  # each adapter converts its own table
    app: dict[str, Any] = {}  # the application tree converts its own table


T = TypeVar("T")


def convert_table(cls: type[T], table: Mapping[str, Any], *, where: str) -> T:
    """Convert a table an adapter or the application reads for itself.

    Raises:
        ConfigError: naming *where* (``[systems.crm]``) and the key path.
    """
    try:
        return msgspec.convert(dict(table), cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file (blocking).

    Raises:
        ConfigError: naming the file: unreadable, not UTF-8, or not TOML.
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def split_url(url: str) -> tuple[urllib.parse.SplitResult, int | None] | None:
    """A URL's parts and port, or None when its boundaries cannot be told.

    A password with an unencoded ``/ ? #`` moves them: urllib then refuses
    the port (its message quoting the password's start), or an ``@`` is left
    after the host. None, rather than an error, so that the caller's message
    quotes no part of the URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if "@" in parts.path + parts.query + parts.fragment:
        return None
    return parts, port


#: The operator's file when none is named, relative to the working directory.
DEFAULT_CONFIG = Path("config/broker.toml")


def config_file(named: str | Path | None) -> Path | None:
    """The file to read: *named*, else `DEFAULT_CONFIG` if it exists, else none.

    ``brokerd`` and ``brokerctl`` both look here, so they agree on the socket.
    """
    if named is not None:
        return Path(named)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def load_config(
    path: Path | None = None, *, environ: Mapping[str, str] = os.environ
) -> Config:
    """Return the effective configuration.

    Raises:
        ConfigError: naming the file or variable and the offending key.
    """
    raw: dict[str, Any] = read_toml(path) if path is not None else {}

    source = str(path) if path is not None else "defaults"
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            _set_from_env(raw, name, value)
            source = f"{source} + environment"

    try:
        # strict=False lets the string "64" from the environment become 64.
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        # e.g. "Expected `int` >= 1 - at `$.amqp.prefetch`"
        raise ConfigError(f"{source}: {exc}") from exc
    # Every configured system gets its queue without being listed twice.
    missing = sorted(set(cfg.systems) - set(cfg.topology.systems))
    if missing:
        topology = msgspec.structs.replace(
            cfg.topology, systems=(*cfg.topology.systems, *missing)
        )
        cfg = msgspec.structs.replace(cfg, topology=topology)
    return cfg


def _set_from_env(raw: dict[str, Any], name: str, value: str) -> None:
    """Set ``BROKER__SECTION[__TABLE...]__KEY`` in *raw*.

    Each part is spelled as the schema says, wherever it sits: a field of a
    section is kebab-case (``PUBLISH_TIMEOUT_S`` is ``publish-timeout-s``,
    ``EVENT_QUEUES`` is ``event-queues``); a key the operator names (a
    system under ``[systems]``, a queue under ``[topology.event-queues]``)
    keeps its underscores (``erp_cloud``). A key the file already has, in
    either spelling, is that key; in a table the schema leaves open (a
    system's own table, ``[app]``: converted later by the adapter or the
    application, whose settings are kebab-case), a new key is kebab-case.

    Raises:
        ConfigError: fewer than two parts, or a part on the way that is not
            a table.
    """
    parts = name.removeprefix(ENV_PREFIX).lower().split("__")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{name}: expected BROKER__<SECTION>__<KEY>")
    table = raw
    schema: Any = Config
    for depth, part in enumerate(parts):
        key, schema = _env_key(table, part, schema)
        if depth == len(parts) - 1:
            table[key] = _env_value(value)
            return
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{name}: [{where}] is not a table")


def _env_key(table: Mapping[str, Any], part: str, schema: Any) -> tuple[str, Any]:
    """The key *part* (lower case, underscores) names in *table*, and its type.

    *schema* is the type of *table*: a `Section`; a ``dict[str, X]`` keyed
    by names (``X`` not `Any`); or a table of settings the schema leaves
    open (``dict[str, Any]``, `Any`).
    """
    kebab = part.replace("_", "-")
    if isinstance(schema, type) and issubclass(schema, msgspec.Struct):
        for field in msgspec.structs.fields(schema):
            if field.encode_name == kebab:
                return kebab, _unannotated(field.type)
        return kebab, Any  # no such field: msgspec names it, with its path
    existing = next((k for k in (part, kebab) if k in table), None)
    if get_origin(schema) is dict:
        values = _unannotated(get_args(schema)[1])
        if values is not Any:
            return existing or part, values
    return existing or kebab, Any


def _unannotated(tp: Any) -> Any:
    """*tp* without its ``Annotated[...]`` constraints."""
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


def _env_value(value: str) -> Any:
    """Read TOML lists and tables from the environment; keep anything else a string."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return tomllib.loads(f"v = {stripped}")["v"]
        except tomllib.TOMLDecodeError:
            return value
    return value
