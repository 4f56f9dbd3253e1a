"""Stripe's request parameters: typed reads of decoded form fields, and refusals.

Each reader takes the decoded form (`adapters.billing.form.decode_form`) and
either returns a typed value or raises `Refusal` with the status, error type,
code and ``param`` Stripe would answer with (``parameter_missing``,
``parameter_unknown``, ``parameter_invalid_integer``…). Validation refusals
are not stored under an idempotency key (``stored=False``): Stripe saves a
result only once an endpoint has begun executing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

import msgspec

from adapters.billing.form import FormNode
from adapters.billing.views import ErrorBody, StripeError

__all__ = [
    "Params",
    "Refusal",
    "missing_param",
    "check_known",
    "read_str",
    "read_int",
    "read_decimal",
    "read_bool",
    "read_enum",
    "read_dict",
    "read_list",
    "read_metadata",
]

#: A decoded form body.
Params = dict[str, FormNode]


class Refusal(Exception):
    """A Stripe error response: status, and the ``error`` body's members."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        stored: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = StripeError(
            type=type,
            code=code,
            message=message,
            param=param,
            doc_url=f"https://stripe.com/docs/error-codes/{code}" if code else None,
        )
        self.stored = stored

    def body(self, request_id: str) -> ErrorBody:
        """The response body, with the dashboard link Stripe adds."""
        return ErrorBody(
            error=msgspec.structs.replace(
                self.error,
                request_log_url=f"https://dashboard.stripe.com/test/logs/{request_id}",
            )
        )


def missing_param(param: str) -> Refusal:
    """A ``parameter_missing`` refusal for *param*."""
    return Refusal(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def check_known(params: Params, allowed: Iterable[str], prefix: str = "") -> None:
    """Refuse the first parameter not in *allowed* (``parameter_unknown``)."""
    allowed_set = set(allowed)
    for name in params:
        if name not in allowed_set:
            full = f"{prefix}[{name}]" if prefix else name
            raise Refusal(
                400,
                f"Received unknown parameter: {full}",
                code="parameter_unknown",
                param=full,
            )


def read_str(
    params: Params, name: str, *, required: bool = False, param: str | None = None
) -> str | None:
    """A string parameter; None when absent."""
    value = params.get(name)
    if value is None:
        if required:
            raise missing_param(param or name)
        return None
    if not isinstance(value, str):
        raise Refusal(400, f"Invalid string: {param or name}", param=param or name)
    if required and not value:
        raise Refusal(
            400,
            f"You passed an empty string for '{param or name}'.",
            code="parameter_invalid_empty",
            param=param or name,
        )
    return value


def read_int(params: Params, name: str, *, param: str | None = None) -> int | None:
    """An integer parameter; None when absent or empty."""
    value = read_str(params, name, param=param)
    if value is None or value == "":
        return None
    if not re.fullmatch(r"-?\d{1,18}", value):
        raise Refusal(
            400,
            f"Invalid integer: {value}",
            code="parameter_invalid_integer",
            param=param or name,
        )
    return int(value)


def read_decimal(
    params: Params, name: str, *, param: str | None = None
) -> Decimal | None:
    """A non-negative decimal parameter; None when absent or empty."""
    value = read_str(params, name, param=param)
    if value is None or value == "":
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite() or number < 0:
        raise Refusal(400, f"Invalid decimal: {value}", param=param or name)
    return number


def read_bool(params: Params, name: str) -> bool | None:
    """A ``true``/``false`` parameter; None when absent."""
    value = read_str(params, name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise Refusal(400, f"Invalid boolean: {value}", param=name)
    return value == "true"


def read_enum(
    params: Params,
    name: str,
    choices: tuple[str, ...],
    *,
    param: str | None = None,
    required: bool = False,
) -> str | None:
    """A parameter that must be one of *choices*; None when absent."""
    value = read_str(params, name, required=required, param=param)
    if value is not None and value not in choices:
        raise Refusal(
            400,
            f"Invalid {name}: must be one of {', '.join(choices)}",
            param=param or name,
        )
    return value


def read_dict(params: Params, name: str, *, param: str | None = None) -> Params | None:
    """A nested object parameter (``name[key]=…``); None when absent."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refusal(400, f"Invalid object: {param or name}", param=param or name)
    return value


def read_list(params: Params, name: str) -> list[FormNode] | None:
    """A list parameter (``name[0]=…`` or ``name[]=…``); None when absent."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise Refusal(400, f"Invalid array: {name}", param=name)
    return value


def read_metadata(params: Params, current: dict[str, str]) -> dict[str, str]:
    """*current* metadata updated by ``metadata[...]``: ``""`` unsets a key."""
    raw = params.get("metadata")
    if raw is None:
        return dict(current)
    if raw == "":
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise Refusal(400, "Invalid object: metadata", param="metadata")
    merged = dict(current)
    for key, value in raw.items():
        assert isinstance(value, str)  # checked above
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged
