from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Config, load_config
from broker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = ROOT / "config" / "broker.toml"


def test_documented_toml_equals_the_code_defaults() -> None:
    """config/broker.toml and the Struct defaults cannot drift apart."""
    assert load_config(DOCUMENTED, environ={}) == Config()


@pytest.mark.parametrize("name", ["BROKER__AMQP__PREFETCH", "BROKER__AMQP__PREFECH"])
def test_bad_keys_and_values_are_named(name: str) -> None:
    """Out-of-range values and typos both fail with the JSON path of the key."""
    with pytest.raises(ConfigError, match=r"\$\.amqp"):
        load_config(environ={name: "0"})


def test_environment_overrides_file_and_coerces_strings(tmp_path: Path) -> None:
    """BROKER__SECTION__KEY beats the file; "64" becomes 64; lists parse as TOML."""
    path = tmp_path / "b.toml"
    path.write_text('[amqp]\nprefetch = 10\n[daemon]\ntransport = "amqp"\n')
    cfg = load_config(
        path,
        environ={
            "BROKER__AMQP__PREFETCH": "64",
            "BROKER__TOPOLOGY__RETRY_TIERS_S": "[1.0, 2.0]",
        },
    )
    assert cfg.amqp.prefetch == 64
    assert cfg.daemon.transport == "amqp"
    assert cfg.topology.retry_tiers_s == (1.0, 2.0)


def test_a_key_of_a_nested_table_comes_from_the_environment(tmp_path: Path) -> None:
    """A system's password in BROKER__SYSTEMS__<NAME>__PASSWORD, not in the file."""
    path = tmp_path / "b.toml"
    path.write_text(
        '[systems.erp_cloud]\nkind = "sap-s4"\nbase-url = "http://sap"\n'
        "[systems.erp_cloud.gateway]\nburst = 5\n"
    )
    cfg = load_config(
        path,
        environ={
            "BROKER__SYSTEMS__ERP_CLOUD__PASSWORD": "s3cret",
            "BROKER__SYSTEMS__ERP_CLOUD__GATEWAY__RATE_PER_S": "2.5",
        },
    )
    erp = cfg.systems["erp_cloud"]
    assert (erp["password"], erp["base-url"]) == ("s3cret", "http://sap")
    assert erp["gateway"] == {"burst": 5, "rate-per-s": "2.5"}
    assert set(cfg.systems) == {"erp_cloud"}
    with pytest.raises(ConfigError, match=r"BROKER__SYSTEMS__ERP_CLOUD__KIND__X"):
        load_config(path, environ={"BROKER__SYSTEMS__ERP_CLOUD__KIND__X": "1"})


def test_unknown_key_in_file_names_file_and_path(tmp_path: Path) -> None:
    """A typo in the operator's file is refused with the file name and the key path."""
    path = tmp_path / "b.toml"
    path.write_text("[core]\nbatch-maxx = 5\n")
    with pytest.raises(ConfigError, match=r"b\.toml.*batch-maxx.*\$\.core"):
        load_config(path, environ={})


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    """Broken TOML names the file."""
    path = tmp_path / "bad.toml"
    path.write_text("[amqp\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(path, environ={})


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 name the file too, instead of a traceback."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        load_config(path, environ={})


def test_an_environment_table_missing_from_the_file_gets_the_schemas_name() -> None:
    """EVENT_QUEUES is the field event-queues; the queue named in it keeps its name."""
    cfg = load_config(
        environ={
            "BROKER__TOPOLOGY__EVENT_QUEUES__REPORTING": '["deal.completed"]',
            "BROKER__TOPOLOGY__EVENT_QUEUES__AUDIT_FEED": '["order.placed"]',
        }
    )
    assert cfg.topology.event_queues == {
        "reporting": ("deal.completed",),
        "audit_feed": ("order.placed",),
    }


def test_a_system_named_in_the_environment_keeps_its_underscores() -> None:
    """BROKER__SYSTEMS__ERP_CLOUD is system erp_cloud; its own keys are kebab-case."""
    cfg = load_config(
        environ={
            "BROKER__SYSTEMS__ERP_CLOUD": '{kind = "sap-s4"}',
            "BROKER__SYSTEMS__CRM__BASE_URL": "http://crm",
            "BROKER__APP__BOOKING_SLA_S": "10",
        }
    )
    assert cfg.systems == {
        "erp_cloud": {"kind": "sap-s4"},
        "crm": {"base-url": "http://crm"},
    }
    assert cfg.app == {"booking-sla-s": "10"}
    assert set(cfg.topology.systems) == {"crm", "erp_cloud"}


def test_a_key_the_file_has_is_overridden_in_its_own_spelling(tmp_path: Path) -> None:
    """A queue the file names audit-feed is that queue, not a second audit_feed."""
    path = tmp_path / "b.toml"
    path.write_text('[topology.event-queues]\naudit-feed = ["order.placed"]\n')
    cfg = load_config(
        path, environ={"BROKER__TOPOLOGY__EVENT_QUEUES__AUDIT_FEED": '["deal.won"]'}
    )
    assert cfg.topology.event_queues == {"audit-feed": ("deal.won",)}


def test_the_control_socket_group_is_a_group_name_or_a_gid(tmp_path: Path) -> None:
    """[control] socket-group takes a name or a number (resolved when binding)."""
    path = tmp_path / "b.toml"
    path.write_text("[control]\nsocket-group = 1001\n")
    assert load_config(path, environ={}).control.socket_group == 1001
    named = load_config(environ={"BROKER__CONTROL__SOCKET_GROUP": "q2c-ops"})
    assert named.control.socket_group == "q2c-ops"


def test_a_dead_letter_may_not_keep_less_than_a_message_may_hold() -> None:
    """max-dead-letter-bytes below max-message-bytes would cut bodies never refused."""
    with pytest.raises(ConfigError, match="max-dead-letter-bytes"):
        load_config(
            environ={
                "BROKER__CORE__MAX_MESSAGE_BYTES": "8192",
                "BROKER__CORE__MAX_DEAD_LETTER_BYTES": "4096",
            }
        )
    ok = load_config(environ={"BROKER__CORE__MAX_DEAD_LETTER_BYTES": "1048576"})
    assert ok.core.max_dead_letter_bytes == ok.core.max_message_bytes
