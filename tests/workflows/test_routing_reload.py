"""Reloading the routing file: what is refused, and what is only warned about."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from actors.workflows.catalogue import demo_reference
from actors.workflows.deal import DealWorkflow
from actors.workflows.routing import RoutingRegistry
from broker import ConfigError, RetryLater
from tests.workflows.test_deal import ACCOUNT, MIXED, NOW

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "routing.toml"
REF = demo_reference()


def routing_file(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "routing.toml"
    path.write_text(SHIPPED.read_text() if text is None else text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# Coexistence routing: which ERP books each order\n",
        '[[overrides]]\nname = "gb-hardware-hold"\nerp = "legacy"\n'
        'legal-entities = ["GB01"]\nregions = ["*"]\nproduct-families = ["hardware"]\n',
    ],
    ids=["empty", "comments-only", "no-default-erp"],
)
def test_a_file_without_default_erp_is_refused_and_the_table_kept(
    tmp_path: Path, text: str
) -> None:
    """An empty or cut-short file (a save in progress) is no "all defaults" table."""
    path = routing_file(tmp_path)
    registry = RoutingRegistry(path)
    before = registry.table

    path.write_text(text)
    result = registry.reload()

    assert not result.reloaded
    assert result.error is not None
    assert "default-erp" in result.error
    assert "routing.toml" in result.error
    assert registry.table is before
    assert registry.table.waves
    assert registry.table.overrides
    # Saved in full, it is taken again.
    routing_file(tmp_path)
    assert registry.reload().reloaded


def test_a_file_without_default_erp_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="default-erp"):
        RoutingRegistry(routing_file(tmp_path, ""))


def test_a_default_only_table_is_still_a_valid_edit(tmp_path: Path) -> None:
    """Everything to one ERP, said explicitly, is a table (the end of a migration)."""
    path = routing_file(tmp_path)
    registry = RoutingRegistry(path)
    path.write_text('default-erp = "cloud"\n')
    assert registry.reload().reloaded
    assert registry.table.default_erp == "cloud"


def unknown_names(logs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """What each ``routing_unknown_names`` warning named."""
    return [e["unknown"] for e in logs if e["event"] == "routing_unknown_names"]


TYPO = SHIPPED.read_text().replace(
    'legal-entities = ["DE01"]', 'legal-entities = ["DE1"]', 1
)


def test_unknown_names_are_logged_at_load_and_on_every_reload(
    tmp_path: Path,
) -> None:
    """A typo (a wave for ``DE1``) is loaded, and named in a warning each time."""
    assert SHIPPED.read_text() != TYPO
    path = routing_file(tmp_path, TYPO)
    with capture_logs() as at_load:
        registry = RoutingRegistry(path, reference=lambda: REF)
    (names,) = unknown_names(at_load)
    assert any("unknown legal entity 'DE1'" in n for n in names)

    with capture_logs() as on_reload:
        assert registry.reload().reloaded
        routing_file(tmp_path)
        assert registry.reload().reloaded
        path.write_text(TYPO)
        assert registry.reload().reloaded
    assert len(unknown_names(on_reload)) == 2
    assert [e["log_level"] for e in on_reload] == ["warning", "warning"]


def test_unknown_names_wait_for_the_catalogue(tmp_path: Path) -> None:
    """No reference data yet at load: the names are checked at the first order."""
    path = routing_file(tmp_path, TYPO)

    def not_loaded() -> object:
        raise RetryLater("the ERP's catalogue is not loaded yet")

    with capture_logs() as logs:
        registry = RoutingRegistry(path, reference=not_loaded)  # type: ignore[arg-type]
        assert unknown_names(logs) == []
        registry.route_order(MIXED, ACCOUNT, REF, at=NOW)
        registry.route_order(MIXED, ACCOUNT, REF, at=NOW)
    assert len(unknown_names(logs)) == 1


def test_the_deal_workflow_checks_the_names_against_its_reference(
    tmp_path: Path,
) -> None:
    """The daemon's registry is checked against what quotes are validated with."""
    registry = RoutingRegistry(routing_file(tmp_path, TYPO))
    with capture_logs() as logs:
        DealWorkflow(routing=registry, reference=lambda: REF)
    assert len(unknown_names(logs)) == 1
