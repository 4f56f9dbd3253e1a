"""Command line: ``brokerd`` (the daemon) and ``brokerctl`` (its admin client).

``brokerd run`` runs the daemon until SIGTERM; ``brokerd migrate`` applies
the store's migrations and exits; ``brokerd topology`` declares the broker
topology and exits; ``brokerd check-config`` prints the effective
configuration (secrets masked). Exit status: 0 ok, 1 failure, 2 usage,
78 invalid configuration.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
import msgspec

from broker.config import DEFAULT_CONFIG, Config, config_file, load_config
from broker.errors import BrokerError, ConfigError
from broker.logging import SECRET_PARAM, configure_logging

__all__ = ["main", "ctl_main", "DEFAULT_CONFIG"]

#: Read when ``--config`` is not given and the file exists.


def _config(path: str | None) -> Config:
    return load_config(config_file(path))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brokerd", description="Q2C Broker: the quote-to-cash integration daemon."
    )
    parser.add_argument(
        "--config",
        help=f"TOML configuration file (default: {DEFAULT_CONFIG} if it exists)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    sub.add_parser("migrate", help="apply the store's migrations and exit")
    sub.add_parser("topology", help="declare exchanges, queues and policies and exit")
    sub.add_parser("check-config", help="print the effective configuration and exit")
    demo = sub.add_parser("demo", help="run the end-to-end demo and print its report")
    demo.add_argument("--deals", type=int, default=1000, help="deals (quote to cash)")
    demo.add_argument(
        "--entries", type=int, default=20_000, help="entries (the ledger demo)"
    )
    return parser


async def _migrate(cfg: Config) -> None:
    from broker.app import open_store

    # `[postgres] migrate = false` is about the daemon's start; this command
    # is how the schema's owner applies them, whatever the file says.
    postgres = msgspec.structs.replace(cfg.postgres, migrate=True)
    owner = msgspec.structs.replace(cfg, postgres=postgres)
    store = await open_store(owner, attempts=3)
    await store.aclose()


async def _topology(cfg: Config) -> None:
    from broker.app import load_tree
    from broker.runtime import Runtime
    from broker.transport.declare import declare_topology
    from broker.transport.tls import load_tls
    from broker.transport.topology import build_topology

    rt = Runtime(cfg)
    load_tree(cfg.daemon.tree)(rt)
    await declare_topology(
        cfg.amqp.url,
        build_topology(rt.topology_config(), rt.routes()),
        management_url=cfg.amqp.management_url,
        apply_policies=cfg.topology.apply_policies,
        tls=await load_tls(cfg.amqp),
        mechanism=cfg.amqp.auth_mechanism,
    )


def _masked(cfg: Config) -> bytes:
    """The configuration as JSON, with every secret in it masked."""
    raw = _mask(msgspec.to_builtins(cfg))
    return msgspec.json.format(msgspec.json.encode(raw), indent=2)


#: Words that make a key's value secret (``api-tokens``, ``client-secret``).
_SECRET_WORDS = frozenset({"password", "secret", "secrets", "token", "tokens"})


def _mask(value: Any, key: str = "") -> Any:
    """*value* with secrets masked: by key name, and a URL's user information."""
    words = set(key.replace("_", "-").split("-"))
    if words & _SECRET_WORDS or key == "api-key":
        return ["***"] * len(value) if isinstance(value, list) else "***"
    if isinstance(value, dict):
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if isinstance(value, str):
        # A password may also sit in a DSN's query (``?password=``) or in
        # its key=value form (``host=db password=…``).
        value = SECRET_PARAM.sub(r"\1***", value)
        if "://" in value and "@" in value:
            scheme, _, rest = value.partition("://")
            return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def _demo(cfg: Config, deals: int, entries: int) -> int:
    from broker.app import load_callable

    configure_logging("warning", cfg.logging.format)
    demo = load_callable(cfg.daemon.demo, "[daemon] demo")
    try:
        status: int = anyio.run(
            lambda: demo(cfg, deals=deals, entries=entries),
            backend="asyncio",
            backend_options={"use_uvloop": True},
        )
    except (BrokerError, BaseExceptionGroup) as exc:
        # The demo runs the daemon in a task group: a refusal such as a
        # missing database arrives wrapped, and is said in one line.
        error = _broker_error(exc)
        if error is None:
            raise
        print(f"brokerd demo: {type(error).__name__}: {error}", file=sys.stderr)
        return 78 if isinstance(error, ConfigError) else 1
    return status


def _broker_error(exc: BaseException) -> BrokerError | None:
    """*exc* if it is a BrokerError, or the first of a group made only of them."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_broker_error(e) for e in exc.exceptions]
        if found and all(e is not None for e in found):
            return found[0]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``brokerd``."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args.config)
    except ConfigError as exc:
        print(f"brokerd: invalid configuration: {exc}", file=sys.stderr)
        return 78
    if args.command == "run":
        from broker.app import run

        return run(cfg)
    if args.command == "demo":
        return _demo(cfg, args.deals, args.entries)
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        if args.command == "migrate":
            anyio.run(_migrate, cfg)
        elif args.command == "topology":
            anyio.run(_topology, cfg)
        else:
            sys.stdout.buffer.write(_masked(cfg) + b"\n")
    except ConfigError as exc:
        print(f"brokerd: invalid configuration: {exc}", file=sys.stderr)
        return 78
    except BrokerError as exc:
        print(f"brokerd {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def ctl_main(argv: list[str] | None = None) -> int:
    """Entry point of ``brokerctl``."""
    from broker.control.ctl import main as ctl

    return ctl(argv)
