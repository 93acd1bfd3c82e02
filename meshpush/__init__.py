"""meshpush: a self-hosted, self-healing WebSocket push service.

Layers, bottom up:

* pure logic, importable without a loop: :mod:`meshpush.settings`, :mod:`meshpush.protocol`
  (frames and close codes), :mod:`meshpush.encoding` (ids in subjects and keys),
  :mod:`meshpush.ring` (slots and owners), :mod:`meshpush.auth` (tokens);
* backends hosted on one trio-asyncio loop: :mod:`meshpush.bridge`, :mod:`meshpush.membership`
  (etcd), :mod:`meshpush.bus` (NATS core + JetStream);
* the node: :mod:`meshpush.sessions` (who is connected), :mod:`meshpush.gateway` (WebSocket),
  :mod:`meshpush.router` (ring changes, subscriptions, migration), :mod:`meshpush.api` (HTTP),
  :mod:`meshpush.node` (wires them);
* tools: :mod:`meshpush.client` (trio SDK), :mod:`meshpush.devcluster`, :mod:`meshpush.cli`.
"""

__version__ = "0.1.0"
