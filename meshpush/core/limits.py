"""Abuse protection, pure logic: token buckets, per-key counters, CIDR filters, sampled logs.

No I/O and no loop: time is passed in (``now``), so everything here is unit-tested exactly.
Every structure is bounded (LRU eviction), so an attacker cycling through addresses cannot
grow memory without limit.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``take`` spends one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (after a refused ``take``)."""
        return max(0.0, (cost - self.tokens) / self.rate) if self.rate > 0 else float("inf")


class KeyedBuckets:
    """One :class:`TokenBucket` per key (e.g. per client IP), at most ``size`` keys (LRU)."""

    def __init__(self, rate: float, burst: float, size: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> tuple[bool, float]:
        """Spend one token of ``key``; returns (allowed, seconds to wait if not)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        ok = bucket.take(now)
        return ok, 0.0 if ok else bucket.retry_after()

    def __len__(self) -> int:
        return len(self._buckets)


class Counter:
    """Open connections per key with a per-key cap and a total cap."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total_cap = total
        self.total = 0
        self._counts: dict[str, int] = {}

    def acquire(self, key: str, capped: bool = True) -> str | None:
        """Count one more for ``key``; or return why not (``"total"`` / ``"per_key"``).
        ``capped=False``: only the total cap applies to this one."""
        if self.total >= self.total_cap:
            return "total"
        if capped and self._counts.get(key, 0) >= self.per_key:
            return "per_key"
        self._counts[key] = self._counts.get(key, 0) + 1
        self.total += 1
        return None

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0)
        if count <= 0:
            return
        self.total -= 1
        if count == 1:
            del self._counts[key]
        else:
            self._counts[key] = count - 1

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)


class FilterError(ValueError):
    """An IP filter file line is not ``allow <cidr>`` / ``block <cidr>`` / comment / blank."""


@dataclass(frozen=True)
class IpFilter:
    """Block list and (optional) allow list of CIDRs. Block wins; an empty allow list allows all."""

    allow: tuple[IpNetwork, ...] = ()
    block: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> IpFilter:
        allow: list[IpNetwork] = []
        block: list[IpNetwork] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            verb, _, cidr = line.partition(" ")
            target = {"allow": allow, "block": block}.get(verb)
            if target is None:
                raise FilterError(f"line {number}: expected 'allow <cidr>' or 'block <cidr>'")
            try:
                target.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise FilterError(f"line {number}: bad CIDR {cidr.strip()!r}") from None
        return cls(tuple(allow), tuple(block))

    def verdict(self, ip: str) -> str | None:
        """None if ``ip`` may connect, else the reason (``"blocked"`` / ``"not_allowed"``)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return "blocked"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.block):
            return "blocked"
        if self.allow and not any(addr in net for net in self.allow):
            return "not_allowed"
        return None


class SampledLog:
    """At most ``per_second`` log lines per reason per second; the rest are counted."""

    def __init__(self, logger: logging.Logger, per_second: int = 5) -> None:
        self.logger = logger
        self.per_second = per_second
        self._window: dict[str, tuple[int, int]] = {}  # reason -> (second, lines so far)
        self.suppressed = 0

    def log(self, now: float, reason: str, message: str, *args: object) -> bool:
        second = int(now)
        window, lines = self._window.get(reason, (second, 0))
        if window != second:
            window, lines = second, 0
        if lines >= self.per_second:
            self.suppressed += 1
            self._window[reason] = (window, lines)
            return False
        self._window[reason] = (window, lines + 1)
        self.logger.warning(message, *args)
        return True


def origin_allowed(origin: str | None, allowed: Iterable[str]) -> bool:
    """Browsers send ``Origin``; non-browsers usually do not. Empty allow list: any origin."""
    allowed = tuple(allowed)
    if not allowed or origin is None:
        return True
    return origin.rstrip("/").lower() in {a.rstrip("/").lower() for a in allowed}


# ------------------------------------------------------------------------ addresses and CIDRs


def address(text: str) -> IpAddress | None:
    """An IP address (IPv4-mapped IPv6 shown as IPv4), or None if ``text`` is not one."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class CidrSet:
    """A set of networks (``trusted_proxies``). Empty: nobody is trusted."""

    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, values: Iterable[str], name: str = "trusted_proxies") -> CidrSet:
        """``10.0.0.0/8``, ``fd00::/8``, or one address; raises ValueError naming the value."""
        networks = []
        for value in values:
            try:
                networks.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"bad value for {name}: {value!r} is not an IP network (CIDR like 10.0.0.0/8)"
                ) from None
        return cls(tuple(networks))

    def __contains__(self, ip: object) -> bool:
        if not self.networks:  # the default: no parsing on every accept
            return False
        addr = address(ip) if isinstance(ip, str) else None
        return addr is not None and any(addr in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)
