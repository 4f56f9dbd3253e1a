"""The served OpenAPI document: JSON Schema patterns in ECMA-262's dialect."""

from __future__ import annotations

from typing import Any

from broker.http.api import ApiRequest, ApiRoute, openapi_document
from canonical.scalars import Sku


async def _skus(_request: ApiRequest) -> object:
    return []


def test_a_non_struct_response_type_is_anchored_with_an_ecma_dollar() -> None:
    r"""A ``list[Sku]`` answer's inline schema ends its pattern in ``$``, not ``\Z``."""
    route = ApiRoute(
        method="GET",
        path="/skus",
        handler=_skus,
        summary="SKUs",
        response_type=list[Sku],
    )
    document = openapi_document([route], [])
    answer = document["paths"]["/api/v1/skus"]["get"]["responses"]["200"]
    schema: dict[str, Any] = answer["content"]["application/json"]["schema"]
    assert schema == {
        "type": "array",
        "items": {"type": "string", "pattern": "^[A-Z0-9][A-Z0-9._-]{1,39}$"},
    }
