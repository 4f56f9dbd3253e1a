"""``[systems.<name>]``: the broker's own keys, checked when the config loads."""

from __future__ import annotations

import msgspec
import pytest

from actors.systems import SystemTable


def test_an_empty_webhook_secret_is_refused() -> None:
    """``webhook-secrets = ["new", ""]`` would accept bodies signed with ""."""
    table = {"kind": "stripe", "webhook-secrets": ["whsec_new", ""]}
    with pytest.raises(msgspec.ValidationError, match=r"webhook-secrets.*\[1\]"):
        msgspec.convert(table, SystemTable)
    ok = msgspec.convert({**table, "webhook-secrets": ["whsec_new"]}, SystemTable)
    assert ok.webhook_secrets == ("whsec_new",)
