"""The admin control socket: wire protocol, server, client and ``brokerctl``.

- `broker.control.protocol`: the JSON-line requests and replies.
- `broker.control.server`: `ControlServer`, a supervised child of the daemon,
  and the `ControlHandler` protocol the composition root implements.
- `broker.control.client`: `ControlClient`, used by ``brokerctl`` and tests.
- `broker.control.ctl`: the ``brokerctl`` command line, and
  `broker.control.ctl_views` its human tables.
- `broker.control.socket_file`: binding the socket file safely (0600 in a
  0700 directory, or 0660 for ``[control] socket-group``; stale sockets
  cleared).

Nothing is imported here, so that ``brokerctl`` starts without loading the
server's dependencies (structlog and its renderers).
"""

from __future__ import annotations

__all__: list[str] = []
