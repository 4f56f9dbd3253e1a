"""Coexistence routing: which ERP books an order while the legacy one is migrated.

The table (``config/routing.toml``) holds migration waves, explicit overrides
and a default ERP; `RoutingTable.route` is a pure function of the order's
facts, a time and the table. Precedence, first that applies wins:

1. **Overrides**, in file order. A ``legacy`` override applies when the
   order's legal entity and region match and *any* of its product families
   does; a ``cloud`` override only when *every* family does. An order goes to
   the cloud ERP only when everything in it may.
2. **Waves.** The order goes to the cloud ERP when each of its product
   families has moved, for its legal entity and region, in a wave whose
   cut-over is at or before the routing time. Waves add up: what moved in an
   earlier wave stays moved. The decision names the wave that completed the
   move (the latest cut-over the order needed).
3. **The default ERP** (``legacy``).

A deal in flight keeps the ERP it started with: the quote-to-cash workflow
routes once, when it builds the order, with the time of the event that
triggered it (not the wall clock, so a replay decides the same), and keeps the
`RouteDecision` in the deal's state. Later events read the stored decision;
they never route again, so a reload never moves a deal.

Reloading: `RoutingRegistry` holds the table in use. There is no reload
command: the daemon's ``routing-watcher`` actor calls
`RoutingRegistry.maybe_reload` every ``[app] routing-poll-s`` seconds, which
stats the file and reads it only when it changed; saving the file is how a
new table comes into force. `RoutingRegistry.reload` swaps the table only
when the new file is valid; an invalid edit keeps the previous table and is
reported (logged by the watcher as ``routing_reload_refused``). A file in use
must name its ``default-erp``: an empty or cut-short file (an editor that
truncates, then writes, caught in between) is refused, not read as "no
rules, everything to the default ERP". Names the rules use that the
reference data does not know (`RoutingTable.unknown_names`: a wave for
``DE1`` that matches nothing) are logged as ``routing_unknown_names`` for the
table loaded at start and for every reloaded one. Reading the file blocks:
from async code, build the registry and call both through
``anyio.to_thread.run_sync``
(``await anyio.to_thread.run_sync(registry.maybe_reload)``), never on the
event loop. `RoutingRegistry.table` and `RoutingRegistry.route` do no I/O.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path
from typing import Annotated

import msgspec
import structlog
from msgspec import Meta

from actors.workflows.rules import ReferenceData
from broker import ConfigError, TransientError
from broker.config import Section, read_toml
from canonical.base import UtcDatetime
from canonical.commerce import Account, ErpKind, Quote

__all__ = [
    "ANY",
    "OrderFacts",
    "order_facts",
    "RouteDecision",
    "Wave",
    "Override",
    "RoutingTable",
    "load_routing",
    "ReloadResult",
    "RoutingRegistry",
]

#: In a wave's or override's list, matches any legal entity, region or family.
ANY = "*"

_log = structlog.get_logger(__name__)

RuleName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")]
Names = Annotated[tuple[Annotated[str, Meta(min_length=1)], ...], Meta(min_length=1)]


class OrderFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What routing looks at; `order_facts` derives them from a quote.

    Attributes:
        legal_entity: the selling legal entity (``DE01``).
        region: the account's sales region (``EMEA``).
        product_families: the families of the order's lines.
    """

    legal_entity: str
    region: str
    product_families: frozenset[str]


def order_facts(quote: Quote, account: Account, ref: ReferenceData) -> OrderFacts:
    """The facts of the order *quote* (sold to *account*) will become.

    Legal entity and region come from the account's country, the families
    from the catalogue's products (not the quote lines' copies).

    Raises:
        ValueError: a line's SKU is not in the catalogue (`validate_quote`
            reports it first).
    """
    policy = ref.policy
    families: set[str] = set()
    for line in quote.lines:
        product = ref.products.get(line.sku)
        if product is None:
            raise ValueError(f"line {line.number} {line.sku}: unknown SKU")
        families.add(product.family)
    return OrderFacts(
        legal_entity=policy.legal_entity.for_country(account.country),
        region=policy.regions.for_country(account.country),
        product_families=frozenset(families),
    )


class RouteDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Which ERP books the order, and why; kept in the deal's state for audit.

    Attributes:
        erp: ``cloud`` or ``legacy``.
        rule: what decided: ``override:<name>``, ``wave:<name>`` or ``default``.
        wave: the wave that moved the order, when a wave decided.
    """

    erp: ErpKind
    rule: str
    wave: str | None = None


class _Section(Section, frozen=True):
    """Base for the routing file's tables."""


class _Scope(_Section, frozen=True):
    """Which legal entities, regions and product families a rule covers."""

    legal_entities: Names
    regions: Names
    product_families: Names

    def covers(self, legal_entity: str, region: str) -> bool:
        """Whether the rule covers this legal entity and region."""
        return _matches(self.legal_entities, legal_entity) and _matches(
            self.regions, region
        )

    def covers_family(self, family: str) -> bool:
        """Whether the rule covers this product family."""
        return _matches(self.product_families, family)


class Wave(_Scope, frozen=True):
    """``[[waves]]``: from its cut-over on, the cloud ERP books what it covers."""

    name: RuleName
    cut_over: UtcDatetime


class Override(_Scope, frozen=True):
    """``[[overrides]]``: pin what it covers to one ERP, optionally for a window."""

    name: RuleName
    erp: ErpKind
    starts: UtcDatetime | None = msgspec.field(default=None, name="from")
    until: UtcDatetime | None = None

    def __post_init__(self) -> None:
        if (
            self.starts is not None
            and self.until is not None
            and self.starts >= self.until
        ):
            raise ValueError(f"override {self.name!r}: 'from' is not before 'until'")

    def applies(self, facts: OrderFacts, at: datetime) -> bool:
        """Whether this override decides for *facts* at *at*."""
        if self.starts is not None and at < self.starts:
            return False
        if self.until is not None and at >= self.until:
            return False
        if not self.covers(facts.legal_entity, facts.region):
            return False
        families = facts.product_families
        if self.erp == "legacy":
            return any(self.covers_family(f) for f in families)
        return bool(families) and all(self.covers_family(f) for f in families)


class RoutingTable(_Section, frozen=True):
    """The whole routing file; build it with `load_routing`."""

    default_erp: ErpKind = "legacy"
    overrides: tuple[Override, ...] = ()
    waves: tuple[Wave, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for name in [o.name for o in self.overrides] + [w.name for w in self.waves]:
            if name in seen:
                raise ValueError(f"rule name {name!r} is used twice")
            seen.add(name)

    def route(self, facts: OrderFacts, at: datetime) -> RouteDecision:
        """Decide which ERP books an order with *facts*, routed at *at*.

        Raises:
            ValueError: *at* has no time zone.
        """
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("routing time must be timezone-aware")
        for override in self.overrides:
            if override.applies(facts, at):
                return RouteDecision(erp=override.erp, rule=f"override:{override.name}")
        wave = self._completing_wave(facts, at)
        if wave is not None:
            return RouteDecision(erp="cloud", rule=f"wave:{wave.name}", wave=wave.name)
        return RouteDecision(erp=self.default_erp, rule="default")

    def _completing_wave(self, facts: OrderFacts, at: datetime) -> Wave | None:
        """The wave that moved the last of the order's families; None if any is left."""
        if not facts.product_families:
            return None
        done = [
            w
            for w in self.waves
            if w.cut_over <= at and w.covers(facts.legal_entity, facts.region)
        ]
        completing: Wave | None = None
        for family in sorted(facts.product_families):
            first = min(
                (w for w in done if w.covers_family(family)),
                key=lambda w: w.cut_over,
                default=None,
            )
            if first is None:
                return None
            if completing is None or first.cut_over > completing.cut_over:
                completing = first
        return completing

    def unknown_names(self, ref: ReferenceData) -> tuple[str, ...]:
        """Names the rules use that *ref* does not know (likely typos).

        A misspelt legal entity never matches, so its wave silently moves
        nothing; call this after loading and log what it returns. Known are
        the legal entities under ``[entities]``, the regions ``[regions]``
        assigns and the families of the catalogue's products.
        """
        policy = ref.policy
        legal_entities = policy.entities.keys()
        regions = {policy.regions.default, *policy.regions.by_country.values()}
        product_families = {p.family for p in ref.products.values()}
        problems: list[str] = []
        rules: list[tuple[str, _Scope]] = [
            *((f"override:{o.name}", o) for o in self.overrides),
            *((f"wave:{w.name}", w) for w in self.waves),
        ]
        known: Collection[str]
        for rule, scope in rules:
            for kind, names, known in (
                ("legal entity", scope.legal_entities, legal_entities),
                ("region", scope.regions, regions),
                ("product family", scope.product_families, product_families),
            ):
                problems.extend(
                    f"{rule}: unknown {kind} {name!r}"
                    for name in names
                    if name != ANY and name not in known
                )
        return tuple(problems)


def _matches(names: tuple[str, ...], value: str) -> bool:
    return ANY in names or value in names


def load_routing(path: Path) -> RoutingTable:
    """Read and check the routing file (blocking: call it off the event loop).

    Raises:
        ConfigError: naming the file and, for a bad value, its key path
            (``$.waves[0].cut-over``).
    """
    return _convert(path, read_toml(path))


def _convert(path: Path, raw: dict[str, object]) -> RoutingTable:
    try:
        return msgspec.convert(raw, RoutingTable)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _load_in_use(path: Path) -> RoutingTable:
    """`load_routing`, refusing a file that does not name its ``default-erp``.

    A routing file in use always names it (the shipped one does, first): one
    that does not is empty, cut short (read in the middle of a save that
    truncates the file, then writes it) or lost the line, and would send
    every new order to the default ERP with no rule at all.

    Raises:
        ConfigError: as `load_routing`, or no ``default-erp``.
    """
    raw = read_toml(path)
    if "default-erp" not in raw:
        what = "is empty" if not raw else "names no default-erp"
        raise ConfigError(
            f"{path}: the routing file {what} (cut short by a save in "
            'progress?); a routing table must set default-erp = "legacy" '
            'or "cloud" explicitly'
        )
    return _convert(path, raw)


class ReloadResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a reload did.

    Attributes:
        reloaded: a new table from the file is now in use.
        error: why the file was refused (the previous table stays in use).
    """

    reloaded: bool
    error: str | None = None


_Signature = tuple[int, int, int]


def _signature(path: Path) -> _Signature | None:
    """Modification time, size and inode: they change when the file is edited."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class RoutingRegistry:
    """The routing table in use and the file it comes from.

    Reading `table` is safe from any thread: a reload builds the new table
    completely, then replaces the reference in one assignment. Reloads are
    serialised with a lock, so two callers of `reload` or `maybe_reload`
    (the routing watcher's worker thread, a test) cannot interleave.

    The names each table in use mentions are checked against the reference
    data (`RoutingTable.unknown_names`) and the unknown ones logged as a
    warning: when the table is loaded or reloaded, if *reference* answers
    then; else (the ERP's catalogue is not read yet) when it first routes
    an order.

    Args:
        path: the routing file; read now, so an invalid file fails the start.
        reference: the reference data the names are checked against (also
            settable later with `check_names`).

    Raises:
        ConfigError: the file is missing, invalid or names no default ERP.
    """

    def __init__(
        self,
        path: Path,
        *,
        reference: Callable[[], ReferenceData] | None = None,
    ) -> None:
        self._path = path
        self._lock = threading.Lock()
        # Stat before reading: an edit in between is then seen by the next check.
        self._seen = _signature(path)
        self._table = _load_in_use(path)
        self._error: str | None = None
        self._reference = reference
        #: The table whose names were last checked.
        self._checked: RoutingTable | None = None
        self._check_names(self._table)

    @property
    def path(self) -> Path:
        """The routing file."""
        return self._path

    @property
    def table(self) -> RoutingTable:
        """The table in use."""
        return self._table

    @property
    def error(self) -> str | None:
        """Why the file's current content was refused; None when it is in use."""
        return self._error

    def route(self, facts: OrderFacts, at: datetime) -> RouteDecision:
        """`RoutingTable.route` with the table in use."""
        return self._table.route(facts, at)

    def route_order(
        self, quote: Quote, account: Account, ref: ReferenceData, *, at: datetime
    ) -> RouteDecision:
        """Route the order *quote* will become, with the table in use.

        Raises:
            ValueError: a SKU is not in the catalogue, or *at* is naive.
        """
        table = self._table
        if self._checked is not table:
            self._check_names(table, ref)
        return table.route(order_facts(quote, account, ref), at)

    def check_names(self, reference: Callable[[], ReferenceData]) -> None:
        """Check the table in use, and every one reloaded, against *reference*."""
        self._reference = reference
        self._check_names(self._table)

    def _check_names(
        self, table: RoutingTable, ref: ReferenceData | None = None
    ) -> None:
        """Log the names *table* uses that the reference data does not know."""
        if ref is None:
            if self._reference is None:
                return
            try:
                ref = self._reference()
            except TransientError:
                return  # the catalogue is not read yet: checked at the first order
        self._checked = table
        unknown = table.unknown_names(ref)
        if unknown:
            _log.warning(
                "routing_unknown_names",
                path=str(self._path),
                unknown=list(unknown),
                hint="a misspelt name matches nothing: its rule moves no order",
            )

    def reload(self) -> ReloadResult:
        """Re-read the file; use it only if it is valid (blocking)."""
        with self._lock:
            self._seen = _signature(self._path)
            try:
                table = _load_in_use(self._path)
            except ConfigError as exc:
                self._error = str(exc)
                return ReloadResult(reloaded=False, error=self._error)
            self._table = table
            self._error = None
            self._check_names(table)
            return ReloadResult(reloaded=True)

    def maybe_reload(self) -> ReloadResult | None:
        """Reload if the file changed since it was last read; None if it did not.

        Cheap enough to call every few seconds: one ``stat``. A refused edit is
        reported once, not on every call, until the file changes again.
        """
        if _signature(self._path) == self._seen:
            return None
        return self.reload()
