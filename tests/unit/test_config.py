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
