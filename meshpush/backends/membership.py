"""Cluster membership in etcd: an ephemeral registration under a lease, and a watched view.

The node grants a lease (TTL ``lease_ttl``), puts ``/meshpush/<cluster>/nodes/<id>`` under it,
keeps it alive every TTL/3 and watches the prefix (from just after the revision of the list
its view came from: no change slips between them); every change (and a periodic re-list, as a
safety net) becomes a full view passed to ``on_view``. Before registering, the node hands the
view *with itself added* to ``on_view`` so it subscribes its future slots before anyone is
redirected to it. If etcd fails, the node keeps its last view (and its sessions), retries with
capped, jittered backoff and registers again when etcd is back. ``leave()`` revokes the lease;
it never raises, whatever etcd does (down, stalled, the client closed under it): a node must
stop cleanly even when its backends do not answer.

Several etcd endpoints (members of one cluster) may be configured: each new session uses the
next one after a failure, so a node whose member died or is cut off reconnects to another.
A lease that was not refreshed for a whole TTL may have expired (unless etcd, asked directly,
says it lives: a keepalive late on a starved node is not a lost lease), and then the other
nodes own our slots: if another node still reaches etcd (asked over HTTP, ``GET /readyz`` ->
``registered``), or no other node answers at all, the node *steps out* of its own view (its
sessions are redirected to the owners the rest of the view names, which is what the others
compute once the lease is gone) and is not ready until it is registered again. When every node
that answers has lost etcd too, etcd itself is down: a restarted etcd renews every lease, no
one takes our slots, so the node keeps serving with its last view.

Health: ``meshpush_backend_up{backend="etcd"}`` is 1 while the node holds a live registration,
``meshpush_backend_rtt_seconds{backend="etcd"}`` is the last keepalive round trip. A stalled
etcd fails the keepalive within ``lease_ttl`` (TTL/3 + 2·TTL/3) and the node turns unready.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import random
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aetcd
import trio
import trio_asyncio

from meshpush.backends.bridge import aio, best_effort
from meshpush.core.ring import NodeInfo, View
from meshpush.core.stats import Tally, snapshot
from meshpush.observe.metrics import Metrics
from meshpush.settings import Settings

log = logging.getLogger(__name__)
OnView = Callable[[View, bool], Awaitable[None]]


class LeaseLost(Exception):
    """etcd says our lease no longer exists (it expired while we could not refresh it)."""


PROBE_TIMEOUT = 1.0  # seconds a peer has to answer GET /readyz
PEER_PROBE_GAP = 0.2  # seconds between the two connection probes of a suspected peer
PEER_PROBE_EVERY = 1.0  # at most one probe round per peer per this many seconds


def _refuses(http_url: str) -> bool:
    """Does the peer's HTTP port refuse connections (nothing listens: its process is gone)?
    A timeout or any other error is no evidence (a partition, a slow host): False. So is an
    unspecified address (a node listening on 0.0.0.0 without a public URL): it would name
    this host, not the peer."""
    parts = urllib.parse.urlsplit(http_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.hostname in (None, "", "0.0.0.0", "::"):
        return False
    try:
        socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    return False


def _peer_registered(http_url: str) -> bool | None:
    """Ask a peer whether it is registered in etcd (``GET /readyz``; 503 has the same body).
    None if it does not answer. Only a hint, so TLS is not verified here."""
    context = None
    if http_url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"{http_url}/readyz", timeout=PROBE_TIMEOUT, context=context
        ) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError:
        return None
    try:
        return bool(json.loads(body)["registered"])
    except (ValueError, KeyError, TypeError):
        return None


def prefix(cluster: str) -> bytes:
    return f"/meshpush/{cluster}/nodes/".encode()


@dataclass(slots=True)
class MembershipStats:
    """Counted by the etcd session; ``backend_up`` is filled in by ``statistics()``."""

    backend_errors: Tally = field(default_factory=Tally)
    backend_rtt: dict[str, float] = field(default_factory=dict)
    backend_up: dict[str, float] = field(default_factory=dict)


class Membership:
    """Registers this node and feeds every membership view to ``on_view``."""

    def __init__(self, settings: Settings, on_view: OnView, metrics: Metrics) -> None:
        self.settings = settings
        self.on_view = on_view
        self.stats = MembershipStats()
        metrics.add_source(self)
        self.me = NodeInfo(settings.node_id, settings.ws_url, settings.http_url, time.time())
        self.prefix = prefix(settings.cluster)
        self.key = self.prefix + settings.node_id.encode()
        self.view: View = {}
        self.registered = False
        self.registrations = 0
        self._client: Any = None
        self._lease: Any = None
        self._leaving = False
        self._endpoint = 0  # index into settings.etcd_endpoints of the current session
        self._lease_at: float | None = None  # trio time the lease was last known to be alive
        self.stepped_out = False
        self._changed = trio.Event()
        self._leases: dict[str, int] = {}  # node id -> lease id of its key, from the last list
        self._listed_at = 0  # the etcd revision of the last list (the watch starts after it)
        self._probed: dict[str, float] = {}  # node id -> when it was last probed
        self._nursery: trio.Nursery | None = None
        #: told of a peer found dead, before its lease is revoked (Router.peer_dead)
        self.on_dead: Callable[[str], None] = lambda node_id: None

    def statistics(self) -> MembershipStats:
        return snapshot(self.stats, backend_up={"etcd": float(self.registered)})

    async def run(self) -> None:
        """Register and watch until cancelled; on any etcd failure, back off and start again
        (on the next configured endpoint)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_lease)
            delay = 0.2
            while not self._leaving:
                try:
                    await self._session()
                except Exception as exc:  # etcd/grpc errors are untyped; logged and counted
                    self.stats.backend_errors["etcd"] += 1
                    self._endpoint += 1
                    log.warning("etcd session ended: %r; retrying on %s", exc, self._endpoint_str)
                await self._lost()
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)
            await trio.sleep_forever()

    @property
    def _endpoint_str(self) -> str:
        host, port = self._current_endpoint()
        return f"{host}:{port}"

    def _current_endpoint(self) -> tuple[str, int]:
        endpoints = self.settings.etcd_endpoints
        return endpoints[self._endpoint % len(endpoints)]

    async def _watch_lease(self) -> None:
        """Step out of our own view once the lease may have expired for the others (see the
        module doc). Two probes half a second apart: a peer that lost etcd at the same time
        may not have noticed yet at the first."""
        ttl = float(self.settings.lease_ttl)
        while True:
            await trio.sleep(min(0.25, ttl / 8))
            lease_at = self._lease_at
            if self._leaving or self.stepped_out or lease_at is None:
                continue
            if trio.current_time() - lease_at <= ttl or not await self._others_reach_etcd():
                continue
            await trio.sleep(0.5)
            if self._lease_at != lease_at or not await self._others_reach_etcd():
                continue
            if self._lease_at != lease_at or self._leaving:  # a new lease meanwhile
                continue
            if not await self._lease_lives():
                await self._step_out()

    async def _lease_lives(self) -> bool:
        """Does etcd say our lease still lives? A keepalive that was late on a starved node is
        not a lost lease: stepping out while the others still route to us would bounce our
        clients between us and them. No answer (etcd unreachable from here) is no evidence."""
        client, lease = self._client, self._lease
        if client is None or lease is None:
            return False
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                info = await aio(client.get_lease_info)(lease.id, keys=False)
            except Exception:  # etcd/grpc errors are untyped: no answer
                return False
            return int(getattr(info, "TTL", -1)) > 0
        return False

    async def _others_reach_etcd(self) -> bool:
        """True if a peer of the last view says it is registered, or if none answers."""
        peers = [n.http_url for n in self.view.values() if n.id != self.me.id]
        if not peers:
            return False  # alone: nobody can take our slots
        answers: list[bool] = []

        async def probe(url: str) -> None:
            answer = await trio.to_thread.run_sync(_peer_registered, url, abandon_on_cancel=True)
            if answer is not None:
                answers.append(answer)

        with trio.move_on_after(PROBE_TIMEOUT + 0.5):
            async with trio.open_nursery() as nursery:
                for url in peers:
                    nursery.start_soon(probe, url)
        return not answers or any(answers)

    async def _step_out(self) -> None:
        self.stepped_out = True
        self.registered = False
        log.warning(
            "lease not refreshed for %ss: it may have expired; giving our slots up",
            self.settings.lease_ttl,
        )
        view = {k: v for k, v in self.view.items() if k != self.me.id}
        with trio.CancelScope(shield=True):
            await self._on_view(view, registered=False)

    async def _session(self) -> None:
        host, port = self._current_endpoint()
        self._client = aetcd.Client(host=host, port=port, timeout=2)
        try:
            with trio.fail_after(5):
                await self._on_view(self._with_me(await self._list()), registered=False)
                await self._register()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive)
                nursery.start_soon(self._watch)
                await self._refresh_loop()
        finally:
            await self._close_client()

    async def _register(self) -> None:
        if self._leaving:  # leave() ran meanwhile: do not come back
            return
        ttl = self.settings.lease_ttl
        granted_at = trio.current_time()
        self._lease = await aio(self._client.lease)(ttl)
        await aio(self._client.put)(self.key, self.me.to_json().encode(), lease=self._lease)
        self._lease_at, self.stepped_out = granted_at, False
        self.registered = True
        self.registrations += 1
        log.info("registered %s (lease %x, ttl %ss)", self.me.id, self._lease.id, ttl)
        await self._on_view(self._with_me(await self._list()), registered=True)

    async def _keepalive(self) -> None:
        interval = max(self.settings.lease_ttl / 3, 0.2)
        while not self._leaving:
            await trio.sleep(interval)
            if self._leaving:
                return
            sent_at = trio.current_time()
            with trio.fail_after(max(interval * 2, 1.0)):
                reply = await aio(self._client.refresh_lease)(self._lease.id)
            self.stats.backend_rtt["etcd"] = trio.current_time() - sent_at
            if reply is None or reply.TTL <= 0:
                raise LeaseLost("lease expired")
            if self.stepped_out:  # it lived after all, but we gave our slots up: start over
                raise LeaseLost("stepped out; registering again")
            self._lease_at = sent_at

    async def _watch(self) -> None:
        """Every change after the list the current view came from (a peer that registered
        between that list and this watch is an event too, not a wait for the re-list)."""
        watch = await aio(self._client.watch_prefix)(
            self.prefix, start_revision=self._listed_at + 1
        )
        try:
            async for _event in trio_asyncio.aio_as_trio(watch):
                self._changed.set()
        finally:
            await best_effort("etcd watch cancel", aio(watch.cancel), 1)

    async def _refresh_loop(self) -> None:
        """Re-list on every watch event, and at least every TTL (a safety net)."""
        while True:
            with trio.move_on_after(self.settings.lease_ttl):
                await self._changed.wait()
            self._changed = trio.Event()
            with trio.fail_after(5):
                view = await self._list()
            if self.settings.node_id not in view and not self._leaving:
                raise LeaseLost("our key vanished from etcd")
            if self.stepped_out:  # until the next registration, we stay out
                view.pop(self.me.id, None)
            await self._on_view(view, registered=not self.stepped_out)

    async def _list(self) -> View:
        result = await aio(self._client.get_prefix)(self.prefix)
        view: View = {}
        for kv in result:
            node_id = kv.key[len(self.prefix) :].decode()
            try:
                view[node_id] = NodeInfo.from_json(node_id, kv.value)
            except (ValueError, KeyError) as exc:
                log.warning("ignoring bad membership entry %r: %r", kv.key, exc)
        self._leases = {kv.key[len(self.prefix) :].decode(): int(kv.lease) for kv in result}
        self._listed_at = int(result.header.revision)
        return view

    def suspect(self, node_id: str) -> None:
        """A client could not reach ``node_id`` (a handshake with ``avoid=``) and the ring still
        names it. If its HTTP port refuses connections twice, its process is gone: revoke its
        lease now rather than wait up to ``lease_ttl`` for etcd to expire it. Bounded: one probe
        round per peer per ``PEER_PROBE_EVERY``; a client's claim alone changes nothing."""
        now = trio.current_time()
        if (
            not self.settings.peer_probe
            or self._nursery is None
            or node_id == self.me.id
            or node_id not in self.view
            or now < self._probed.get(node_id, -math.inf) + PEER_PROBE_EVERY
        ):
            return
        self._probed[node_id] = now
        self._nursery.start_soon(self._probe_peer, node_id)

    async def _probe_peer(self, node_id: str) -> None:
        info, lease = self.view.get(node_id), self._leases.get(node_id)
        if info is None or not lease:
            return
        for attempt in range(2):
            if attempt:
                await trio.sleep(PEER_PROBE_GAP)
            if not await trio.to_thread.run_sync(_refuses, info.http_url, abandon_on_cancel=True):
                return
        client = self._client
        if client is None or self._leases.get(node_id) != lease:
            return  # etcd session gone, or the peer registered again meanwhile: not that one
        log.warning("peer %s refuses connections: revoking its lease %x", node_id, lease)
        self.on_dead(node_id)
        with trio.move_on_after(2):
            try:
                await aio(client.revoke_lease)(lease)
            except Exception as exc:  # etcd errors are untyped; "not found": another was first
                log.info("lease %x of %s not revoked: %r", lease, node_id, exc)

    def _with_me(self, view: View) -> View:
        return {**view, self.me.id: self.me}

    async def _on_view(self, view: View, registered: bool) -> None:
        self.view = view
        await self.on_view(view, registered)

    async def _lost(self) -> None:
        """etcd is gone: keep serving with the last view, but say we are not registered."""
        self.registered = False
        with trio.CancelScope(shield=True):
            await self.on_view(self.view, False)

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await best_effort("etcd client close", aio(client.close), 1)

    async def leave(self) -> None:
        """Revoke the lease now (clean shutdown / drain): others drop us from the ring at once."""
        if self._leaving:  # drain and then stop both leave: one attempt is enough
            return
        self._leaving = True
        client, lease = self._client, self._lease
        if client is None or lease is None:
            self.registered = False
            return
        # the membership session may close the client under this call (etcd stopped answering)
        if await best_effort("etcd lease revoke", lambda: aio(client.revoke_lease)(lease.id), 2):
            log.info("lease revoked")
        else:
            self.stats.backend_errors["etcd"] += 1
            log.warning("lease not revoked; it expires within %ss", self.settings.lease_ttl)
        self.registered = False
