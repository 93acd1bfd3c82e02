"""meshpush: a self-hosted, self-healing WebSocket push service.

Packages, bottom up:

* :mod:`meshpush.core` — the pure logic, sans-IO, importable without a running loop: frames and
  close codes (``protocol``), one session's rules (``machine``, ``feed``), WebSocket frames and
  the upgrade request (``frames``, ``upgrade``), ids in subjects and keys (``encoding``), slots
  and owners (``ring``), tokens (``auth``), limits and the stats records;
* :mod:`meshpush.observe` — what operators see: the metrics registry, tracing hooks, log
  lines, the event-loop stall monitor;
* :mod:`meshpush.backends` — etcd membership, the NATS link and its wire codec, the bus (live
  routing), the JetStream store and its pipelined publishes, the one trio -> asyncio bridge;
* :mod:`meshpush.server` — the node's I/O: admission and the WebSocket gateway, sessions and the
  hub's fan-out, the router (ring changes, subscriptions, migration), the HTTP API, presence,
  webhooks; :mod:`meshpush.server.node` wires them;
* :mod:`meshpush.local` — local clusters of real processes (``meshpush dev``, the tests, the
  benchmarks) and a TCP fault proxy.

At the top, what users import or run: :mod:`meshpush.settings` (the one typed settings object),
the SDKs :mod:`meshpush.client` (receivers, trio) and :mod:`meshpush.publisher` (publishers,
sync and asyncio), :mod:`meshpush.webhook_verify` (checking webhook signatures) and
:mod:`meshpush.cli` (the ``meshpush`` command).
"""

__version__ = "0.1.0"
