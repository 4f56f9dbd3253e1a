"""Stripe's form encoding: nested keys out, nested dicts and lists back in."""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.billing.form import FormError, decode_form, encode_form


def test_nested_values_spell_their_structure_in_the_key() -> None:
    """Mappings become ``a[b]``, sequences ``a[0]``; scalars Stripe's way."""
    body = encode_form(
        {
            "customer": "cus_1",
            "items": [{"price_data": {"unit_amount_decimal": Decimal("1050.5")}}],
            "metadata": {"q2c_deal_id": "deal-1"},
            "auto_advance": False,
            "days_until_due": 30,
            "description": None,
        }
    )
    assert unquote(body).split("&") == [
        "customer=cus_1",
        "items[0][price_data][unit_amount_decimal]=1050.5",
        "metadata[q2c_deal_id]=deal-1",
        "auto_advance=false",
        "days_until_due=30",
    ]


def test_decoding_builds_dicts_and_lists() -> None:
    """Indices and ``[]`` give lists; names give dicts; empty values stay."""
    assert decode_form(
        "items[1][price]=p2&items[0][price]=p1&expand[]=a&expand[]=b&metadata[k]="
    ) == {
        "items": [{"price": "p1"}, {"price": "p2"}],
        "expand": ["a", "b"],
        "metadata": {"k": ""},
    }


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("items[0]=a&items[2]=b", "indices"),
        ("a=1&a=2", "more than once"),
        ("a=1&a[b]=2", "nests under a plain value"),
        ("a[]=1&a[x]=2", "mixes"),
        ("[x]=1", "malformed key"),
        ("a[b=1", "malformed key"),
    ],
)
def test_inconsistent_keys_are_refused(body: str, reason: str) -> None:
    """Keys that cannot describe one structure are errors."""
    with pytest.raises(FormError, match=reason):
        decode_form(body)


def test_too_many_fields_are_refused() -> None:
    """A form body is bounded at 1000 fields."""
    with pytest.raises(FormError, match="not decodable"):
        decode_form("&".join(f"f{i}=1" for i in range(1001)))


_names = st.text("abcdefghij_", min_size=1, max_size=6)
_leaves = st.text(min_size=1, max_size=10)
_trees = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, min_size=1, max_size=3)
        | st.dictionaries(_names, children, min_size=1, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(_names, _trees, max_size=4))
def test_encode_then_decode_is_the_identity(params: dict[str, object]) -> None:
    """Whatever nesting goes out comes back."""
    assert decode_form(encode_form(params)) == params  # type: ignore[arg-type]
