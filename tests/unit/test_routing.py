from __future__ import annotations

import functools
import os
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.workflows.catalogue import demo_reference
from actors.workflows.routing import (
    OrderFacts,
    RouteDecision,
    RoutingRegistry,
    RoutingTable,
    load_routing,
    order_facts,
)
from actors.workflows.rules import ReferenceData
from broker.errors import ConfigError
from canonical.commerce import Account, Quote, QuoteLine
from canonical.scalars import Money

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "routing.toml"

CUT_OVER = datetime(2026, 1, 5, tzinfo=UTC)

TABLE = """
default-erp = "legacy"

[[overrides]]
name = "hold-hardware"
erp = "legacy"
legal-entities = ["DE01"]
regions = ["*"]
product-families = ["hardware"]

[[overrides]]
name = "pilot"
erp = "cloud"
legal-entities = ["US01"]
regions = ["AMER"]
product-families = ["saas", "services"]
from = 2025-10-01T00:00:00Z
until = 2025-12-01T00:00:00Z

[[waves]]
name = "w1"
cut-over = 2025-07-01T00:00:00Z
legal-entities = ["DE01"]
regions = ["EMEA"]
product-families = ["saas"]

[[waves]]
name = "w2"
cut-over = 2026-01-05T00:00:00Z
legal-entities = ["*"]
regions = ["EMEA"]
product-families = ["software", "hardware"]
"""


def facts(entity: str, region: str, *families: str) -> OrderFacts:
    return OrderFacts(
        legal_entity=entity, region=region, product_families=frozenset(families)
    )


def write(path: Path, text: str, *, mtime_ns: int | None = None) -> Path:
    path.write_text(text, encoding="utf-8")
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


@pytest.fixture
def table(tmp_path: Path) -> RoutingTable:
    return load_routing(write(tmp_path / "routing.toml", TABLE))


@pytest.fixture(scope="module")
def ref() -> ReferenceData:
    return demo_reference()


# --- precedence --------------------------------------------------------------


def test_nothing_applies_means_the_default_erp(table: RoutingTable) -> None:
    """An order no rule covers goes to default-erp, and says so."""
    decision = table.route(facts("GB01", "EMEA", "saas"), CUT_OVER)
    assert decision == RouteDecision(erp="legacy", rule="default", wave=None)


def test_wave_moves_its_scope_from_its_cut_over_on(table: RoutingTable) -> None:
    """One microsecond before the cut-over: legacy; at it (inclusive): cloud."""
    order = facts("GB01", "EMEA", "software")
    before = table.route(order, CUT_OVER - timedelta(microseconds=1))
    at = table.route(order, CUT_OVER)
    assert before == RouteDecision(erp="legacy", rule="default")
    assert at == RouteDecision(erp="cloud", rule="wave:w2", wave="w2")


def test_cut_over_compares_instants_not_wall_clock_digits(table: RoutingTable) -> None:
    """A routing time in another zone is compared as the same instant."""
    cet = timezone(timedelta(hours=1))
    # 00:59 CET on 5 January is 23:59 UTC on the 4th: before the cut-over.
    early = datetime(2026, 1, 5, 0, 59, tzinfo=cet)
    late = datetime(2026, 1, 5, 1, 0, tzinfo=cet)
    assert table.route(facts("GB01", "EMEA", "software"), early).erp == "legacy"
    assert table.route(facts("GB01", "EMEA", "software"), late).erp == "cloud"


def test_waves_add_up_and_the_later_one_completes_the_move(
    table: RoutingTable,
) -> None:
    """SaaS moved in w1, software in w2: a mixed order moves only after w2."""
    order = facts("DE01", "EMEA", "saas", "software")
    mid = datetime(2025, 9, 1, tzinfo=UTC)
    assert table.route(facts("DE01", "EMEA", "saas"), mid).rule == "wave:w1"
    assert table.route(order, mid) == RouteDecision(erp="legacy", rule="default")
    assert table.route(order, CUT_OVER) == RouteDecision(
        erp="cloud", rule="wave:w2", wave="w2"
    )


def test_wave_scope_needs_entity_and_region(table: RoutingTable) -> None:
    """w1 moves DE01 in EMEA only: another region or entity stays on legacy."""
    later = datetime(2025, 9, 1, tzinfo=UTC)
    assert table.route(facts("DE01", "APAC", "saas"), later).erp == "legacy"
    assert table.route(facts("US01", "EMEA", "saas"), later).erp == "legacy"


def test_legacy_override_beats_a_wave_on_any_family(table: RoutingTable) -> None:
    """Hardware moved in w2, but DE01's hold pins any order containing hardware."""
    decision = table.route(facts("DE01", "EMEA", "hardware", "software"), CUT_OVER)
    assert decision == RouteDecision(erp="legacy", rule="override:hold-hardware")
    # Without hardware, w2 (with w1 for saas) moves the order.
    assert table.route(facts("DE01", "EMEA", "saas", "software"), CUT_OVER).erp == (
        "cloud"
    )


def test_cloud_override_needs_every_family_and_its_window(
    table: RoutingTable,
) -> None:
    """The pilot covers saas+services, October to December; hardware spoils it."""
    inside = datetime(2025, 11, 1, tzinfo=UTC)
    pilot = RouteDecision(erp="cloud", rule="override:pilot")
    assert table.route(facts("US01", "AMER", "saas", "services"), inside) == pilot
    assert table.route(facts("US01", "AMER", "saas", "hardware"), inside).erp == (
        "legacy"
    )
    start = datetime(2025, 10, 1, tzinfo=UTC)
    end = datetime(2025, 12, 1, tzinfo=UTC)
    assert table.route(facts("US01", "AMER", "saas"), start) == pilot
    assert table.route(facts("US01", "AMER", "saas"), end).rule == "default"
    assert (
        table.route(facts("US01", "AMER", "saas"), start - timedelta(seconds=1)).rule
        == "default"
    )


def test_first_matching_override_wins(tmp_path: Path) -> None:
    """Overrides are tried in file order."""
    text = """
[[overrides]]
name = "a"
erp = "cloud"
legal-entities = ["*"]
regions = ["*"]
product-families = ["*"]

[[overrides]]
name = "b"
erp = "legacy"
legal-entities = ["*"]
regions = ["*"]
product-families = ["*"]
"""
    table = load_routing(write(tmp_path / "r.toml", text))
    assert table.route(facts("X", "Y", "z"), CUT_OVER).rule == "override:a"


def test_an_order_without_families_is_not_moved_by_waves(
    table: RoutingTable,
) -> None:
    """No families: nothing says the cloud ERP may take it."""
    assert table.route(facts("DE01", "EMEA"), CUT_OVER).rule == "default"


def test_naive_routing_time_is_refused(table: RoutingTable) -> None:
    """A time without a zone would compare wrongly with UTC cut-overs."""
    with pytest.raises(ValueError, match="timezone"):
        table.route(facts("DE01", "EMEA", "saas"), datetime(2026, 1, 5))


@functools.cache
def _shipped() -> RoutingTable:
    return load_routing(SHIPPED)


@given(
    entity=st.sampled_from(["DE01", "GB01", "US01", "NL01"]),
    region=st.sampled_from(["EMEA", "AMER", "APAC"]),
    families=st.frozensets(
        st.sampled_from(["saas", "software", "hardware", "services"]), min_size=1
    ),
    t1=st.datetimes(
        min_value=datetime(2025, 1, 1),
        max_value=datetime(2027, 1, 1),
        timezones=st.just(UTC),
    ),
    step=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)),
)
def test_without_overrides_a_moved_order_stays_moved(
    entity: str,
    region: str,
    families: frozenset[str],
    t1: datetime,
    step: timedelta,
) -> None:
    """Waves only ever move orders to the cloud ERP: routing is monotone in time."""
    waves_only = RoutingTable(default_erp="legacy", waves=_shipped().waves)
    order = OrderFacts(legal_entity=entity, region=region, product_families=families)
    if waves_only.route(order, t1).erp == "cloud":
        assert waves_only.route(order, t1 + step).erp == "cloud"


# --- the shipped file -----------------------------------------------------------


def test_shipped_routing_loads_and_names_only_known_things(
    ref: ReferenceData,
) -> None:
    """config/routing.toml is valid and every name in it is in the reference data."""
    table = load_routing(SHIPPED)
    assert table.default_erp == "legacy"
    assert table.waves
    assert table.unknown_names(ref) == ()


def test_unknown_names_reports_typos(tmp_path: Path, ref: ReferenceData) -> None:
    """A misspelt entity, region or family is named with its rule."""
    text = """
[[waves]]
name = "w"
cut-over = 2026-01-01T00:00:00Z
legal-entities = ["DE1"]
regions = ["EMAE"]
product-families = ["*", "sas"]
"""
    table = load_routing(write(tmp_path / "r.toml", text))
    assert table.unknown_names(ref) == (
        "wave:w: unknown legal entity 'DE1'",
        "wave:w: unknown region 'EMAE'",
        "wave:w: unknown product family 'sas'",
    )


def test_route_order_uses_catalogue_families(ref: ReferenceData) -> None:
    """Facts come from the account's country and the catalogue, not the line copy."""
    line = QuoteLine(
        number=1,
        sku="SAAS-ANL",
        family="hardware",  # wrong copy on the quote line
        quantity=Decimal(1),
        list_price=Decimal("30.00"),
        unit_price=Decimal("30.00"),
        net_total=Decimal("30.00"),
    )
    quote = Quote(
        id="quote-1",
        opportunity_id="opp-1",
        account_id="acct-1",
        currency="GBP",
        lines=(line,),
        net_total=Money(amount=Decimal("30.00"), currency="GBP"),
        status="approved",
        tax_country="IE",
    )
    account = Account(id="acct-1", name="Eire Ltd", country="IE", currency="EUR")
    assert order_facts(quote, account, ref) == facts("GB01", "EMEA", "saas")

    registry = RoutingRegistry(SHIPPED)
    at = datetime(2025, 8, 1, tzinfo=UTC)
    assert registry.route_order(quote, account, ref, at=at) == RouteDecision(
        erp="cloud", rule="wave:wave-1-gb-saas", wave="wave-1-gb-saas"
    )


def test_order_facts_refuses_an_unknown_sku(ref: ReferenceData) -> None:
    """Routing an unvalidated quote is a caller bug, not a default."""
    line = QuoteLine(
        number=3,
        sku="NOPE-1",
        quantity=Decimal(1),
        list_price=Decimal(1),
        unit_price=Decimal(1),
        net_total=Decimal(1),
    )
    quote = Quote(
        id="quote-1",
        opportunity_id="opp-1",
        account_id="acct-1",
        currency="EUR",
        lines=(line,),
        net_total=Money(amount=Decimal(1), currency="EUR"),
        status="approved",
        tax_country="DE",
    )
    account = Account(id="acct-1", name="A", country="DE", currency="EUR")
    with pytest.raises(ValueError, match="line 3 NOPE-1"):
        order_facts(quote, account, ref)


# --- loading ---------------------------------------------------------------------

WAVE = """
[[waves]]
name = "w"
cut-over = 2026-01-01T00:00:00Z
legal-entities = ["DE01"]
regions = ["*"]
product-families = ["*"]
"""


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('default-erp = "legacy"\ndefault-erpp = "cloud"\n', r"default-erpp"),
        (
            WAVE.replace('name = "w"', 'name = "w"\ncutover = 1'),
            r"cutover.*\$\.waves\[0\]",
        ),
        (WAVE.replace("00:00:00Z", "00:00:00"), r"timezone.*\$\.waves\[0\]\.cut-over"),
        (WAVE.replace('["DE01"]', "[]"), r"\$\.waves\[0\]\.legal-entities"),
        ('default-erp = "sap"\n', r"\$\.default-erp"),
        (WAVE + WAVE, r"'w' is used twice"),
        (
            """
[[overrides]]
name = "o"
erp = "legacy"
legal-entities = ["*"]
regions = ["*"]
product-families = ["*"]
from = 2026-01-01T00:00:00Z
until = 2025-01-01T00:00:00Z
""",
            r"'from' is not before 'until'.*\$\.overrides\[0\]",
        ),
        ("[[waves]\n", r"Expected"),
    ],
)
def test_invalid_files_name_file_and_key(
    tmp_path: Path, text: str, pattern: str
) -> None:
    """Typos, bad values and broken TOML are refused, naming the file and key path."""
    path = write(tmp_path / "bad-routing.toml", text)
    with pytest.raises(ConfigError, match=r"bad-routing\.toml") as info:
        load_routing(path)
    assert info.match(pattern)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """An absent routing file fails the start with its path."""
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_routing(tmp_path / "absent.toml")


# --- reloading ---------------------------------------------------------------------


def test_reload_swaps_in_a_valid_edit(tmp_path: Path) -> None:
    """After a valid edit and reload, new orders follow the new table."""
    path = write(tmp_path / "routing.toml", TABLE)
    registry = RoutingRegistry(path)
    order = facts("GB01", "EMEA", "saas")
    assert registry.route(order, CUT_OVER).erp == "legacy"

    write(path, 'default-erp = "cloud"\n')
    result = registry.reload()
    assert result.reloaded
    assert result.error is None
    assert registry.route(order, CUT_OVER) == RouteDecision(erp="cloud", rule="default")


def test_invalid_reload_keeps_the_old_table_and_reports(tmp_path: Path) -> None:
    """A broken edit is refused; the table in use is the previous one, unchanged."""
    path = write(tmp_path / "routing.toml", TABLE)
    registry = RoutingRegistry(path)
    before = registry.table

    write(path, TABLE.replace("cut-over", "cut_over", 1))
    result = registry.reload()
    assert not result.reloaded
    assert result.error is not None
    assert "cut_over" in result.error
    assert "routing.toml" in result.error
    assert registry.table is before
    assert registry.error == result.error

    write(path, TABLE)
    assert registry.reload().reloaded
    assert registry.error is None


def test_maybe_reload_reads_only_a_changed_file(tmp_path: Path) -> None:
    """An untouched file is not re-read; a new mtime triggers the reload."""
    path = write(tmp_path / "routing.toml", TABLE, mtime_ns=1_000_000_000)
    registry = RoutingRegistry(path)
    table = registry.table
    assert registry.maybe_reload() is None
    assert registry.table is table

    # Same size, same inode: only the modification time says it changed.
    edited = TABLE.replace('default-erp = "legacy"', 'default-erp = "cloud" ')
    assert len(edited) == len(TABLE)
    write(path, edited, mtime_ns=2_000_000_000)
    result = registry.maybe_reload()
    assert result is not None
    assert result.reloaded
    assert registry.table.default_erp == "cloud"
    assert registry.maybe_reload() is None


def test_a_refused_edit_is_reported_once_until_the_file_changes(
    tmp_path: Path,
) -> None:
    """The watcher does not re-parse (and re-log) the same broken file every tick."""
    path = write(tmp_path / "routing.toml", TABLE, mtime_ns=1_000_000_000)
    registry = RoutingRegistry(path)
    write(path, "default-erp = 1\n", mtime_ns=2_000_000_000)
    first = registry.maybe_reload()
    assert first is not None
    assert first.error is not None
    assert registry.maybe_reload() is None
    assert registry.table.waves  # still the original table

    write(path, TABLE, mtime_ns=3_000_000_000)
    fixed = registry.maybe_reload()
    assert fixed is not None
    assert fixed.reloaded


def test_deleted_file_keeps_the_table(tmp_path: Path) -> None:
    """A routing file removed under a running daemon is an error, not an empty table."""
    path = write(tmp_path / "routing.toml", TABLE)
    registry = RoutingRegistry(path)
    path.unlink()
    result = registry.maybe_reload()
    assert result is not None
    assert not result.reloaded
    assert registry.table.overrides
    assert registry.maybe_reload() is None


def test_invalid_file_at_start_fails(tmp_path: Path) -> None:
    """The first load has no previous table to fall back on: it raises."""
    path = write(tmp_path / "routing.toml", "default-erp = 1\n")
    with pytest.raises(ConfigError, match=r"\$\.default-erp"):
        RoutingRegistry(path)


def test_a_stored_decision_survives_a_reload(tmp_path: Path) -> None:
    """The decision is a value: a deal that kept it is unaffected by a new table."""
    path = write(tmp_path / "routing.toml", TABLE)
    registry = RoutingRegistry(path)
    order = facts("DE01", "EMEA", "saas")
    kept = registry.route(order, CUT_OVER)
    write(path, 'default-erp = "legacy"\n')
    assert registry.reload().reloaded
    assert kept == RouteDecision(erp="cloud", rule="wave:w1", wave="w1")
    assert registry.route(order, CUT_OVER).erp == "legacy"
