"""Stripe's request bodies: ``application/x-www-form-urlencoded`` with nested keys.

Stripe's v1 API takes form fields, not JSON. Structure is spelled in the key:
``metadata[q2c_account_id]=acct-1``, ``items[0][price]=price_1``,
``items[0][price_data][recurring][interval]=month``, ``expand[]=customer``.
Booleans are ``true``/``false``; an empty value unsets a field (a metadata
key, for instance). `encode_form` writes such bodies from nested Python
values, `decode_form` reads them back into nested dicts and lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from urllib.parse import parse_qsl, urlencode

__all__ = [
    "FormValue",
    "FormNode",
    "FormError",
    "encode_form",
    "decode_form",
    "form_pairs",
    "CONTENT_TYPE",
]

#: Media type of every Stripe v1 request body.
CONTENT_TYPE = "application/x-www-form-urlencoded"

#: What `encode_form` takes: scalars, or mappings and sequences of them.
FormValue = (
    str
    | int
    | bool
    | Decimal
    | None
    | Mapping[str, "FormValue"]
    | Sequence["FormValue"]
)
#: What `decode_form` gives back: every leaf is a string.
FormNode = str | dict[str, "FormNode"] | list["FormNode"]

_MAX_FIELDS = 1000
_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


class FormError(ValueError):
    """A form body whose keys do not nest consistently; names the key."""


def encode_form(params: Mapping[str, FormValue]) -> str:
    """Encode nested *params* the way Stripe's libraries do.

    ``None`` values are left out; use ``""`` to unset a field.
    """
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        _flatten(key, value, pairs)
    return urlencode(pairs)


def form_pairs(body: str) -> list[tuple[str, str]]:
    """The body's ``(key, value)`` pairs in order, percent-decoded.

    Raises:
        FormError: more than 1000 fields, or not decodable.
    """
    try:
        return parse_qsl(
            body,
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=_MAX_FIELDS,
        )
    except ValueError as exc:
        raise FormError(f"form body is not decodable: {exc}") from exc


def decode_form(body: str) -> dict[str, FormNode]:
    """Decode a form body into nested dicts (``a[b]``) and lists (``a[0]``, ``a[]``).

    Raises:
        FormError: a key is malformed, a field is both a value and a
            container, or list indices are not 0, 1, 2, … in some order.
    """
    root: dict[str, FormNode] = {}
    for key, value in form_pairs(body):
        match = _KEY.fullmatch(key)
        if match is None:
            raise FormError(f"malformed key {key!r}")
        path = [match.group(1), *_SEGMENT.findall(match.group(2))]
        _insert(root, path, value, key)
    return {k: _listify(v, k) for k, v in root.items()}


def _flatten(key: str, value: FormValue, out: list[tuple[str, str]]) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        out.append((key, "true" if value else "false"))
    elif isinstance(value, Decimal):
        out.append((key, format(value, "f")))
    elif isinstance(value, str | int):
        out.append((key, str(value)))
    elif isinstance(value, Mapping):
        for sub, item in value.items():
            _flatten(f"{key}[{sub}]", item, out)
    else:
        for index, item in enumerate(value):
            _flatten(f"{key}[{index}]", item, out)


# While inserting, lists appended with "[]" are dicts keyed by a private marker
# index; `_listify` turns every all-numeric dict into a list at the end.
_APPEND = "\x00"


def _insert(node: dict[str, FormNode], path: list[str], value: str, key: str) -> None:
    head, rest = path[0], path[1:]
    if head == "":
        head = f"{_APPEND}{sum(1 for k in node if k.startswith(_APPEND))}"
    if not rest:
        if head in node:
            raise FormError(f"field {key!r} is given more than once")
        node[head] = value
        return
    child = node.setdefault(head, {})
    if not isinstance(child, dict):
        raise FormError(f"field {key!r} nests under a plain value")
    _insert(child, rest, value, key)


def _listify(node: FormNode, key: str) -> FormNode:
    if not isinstance(node, dict):
        return node
    if node and all(k.startswith(_APPEND) for k in node):
        return [_listify(v, key) for v in node.values()]
    if node and all(k.isdigit() for k in node):
        by_index = {int(k): v for k, v in node.items()}
        if sorted(by_index) != list(range(len(node))):
            raise FormError(
                f"list {key!r} has indices {sorted(node)}, not 0..{len(node) - 1}"
            )
        return [_listify(by_index[i], f"{key}[{i}]") for i in range(len(node))]
    if any(k.startswith(_APPEND) for k in node):
        raise FormError(f"field {key!r} mixes [] with named keys")
    return {k: _listify(v, f"{key}[{k}]") for k, v in node.items()}
