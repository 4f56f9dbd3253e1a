"""CloudEvents 1.0 and W3C Trace Context as they arrive on the wire.

Read side only: the JSON event and batch formats (structured content mode),
the HTTP binary content mode, and the ``traceparent``/``tracestate`` headers.
Invalid events raise `broker.errors.SchemaInvalid`; a batch reports each bad
member separately as a `MemberError`.
"""

from __future__ import annotations

from adapters.cloudevents.httpbinding import content_mode, parse_binary
from adapters.cloudevents.jsonformat import (
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    parse_batch,
    parse_structured,
)
from adapters.cloudevents.traceparent import (
    TraceContext,
    TraceContextInvalid,
    TraceParent,
    TraceState,
    extract,
    parse_traceparent,
    parse_tracestate,
)
from adapters.cloudevents.views import CloudEventView, MemberError, is_json_media_type

__all__ = [
    # Events
    "CloudEventView",
    "MemberError",
    "parse_structured",
    "parse_batch",
    "parse_binary",
    "content_mode",
    "is_json_media_type",
    "CONTENT_TYPE",
    "BATCH_CONTENT_TYPE",
    # Trace context
    "TraceParent",
    "TraceState",
    "TraceContext",
    "TraceContextInvalid",
    "parse_traceparent",
    "parse_tracestate",
    "extract",
]
