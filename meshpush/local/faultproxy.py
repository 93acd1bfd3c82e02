"""A fault-injecting TCP proxy on loopback, for the chaos suite's network partitions.

``python -m meshpush.local.faultproxy LOCALPORT=HOST:PORT [...]`` listens on 127.0.0.1:LOCALPORT for
each pair and forwards every connection to HOST:PORT. SIGUSR1 *cuts* the link: from then on
no byte moves in either direction and nothing is closed — data waits in the kernel's buffers,
new connections are accepted but not connected upstream, and an upstream that closes is not
passed on — exactly like packets vanishing in a network split: each side only notices through
its own timeouts. SIGUSR2 *heals* it: bytes flow again (what was held is delivered, like TCP
retransmission after a split heals). SIGTERM/SIGINT exit.

Only loopback: the proxy binds 127.0.0.1 and the chaos suite points it at 127.0.0.1 servers.
Threads, not an event loop: a handful of long-lived connections per link, and a blocking
``recv`` cannot lose data when the gate closes between reading and writing.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from types import FrameType

BUFFER = 65536


class Gate:
    """Open: bytes flow. Closed: every pump waits before it moves anything."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def wait(self) -> None:
        self._open.wait()


def _close(*socks: socket.socket) -> None:
    """Shut down, then close: ``close`` alone does not wake the other pump's blocked ``recv``
    on Linux, so the connection would stay open (and its peer would never see the FIN)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


def _pump(src: socket.socket, dst: socket.socket, gate: Gate) -> None:
    """Copy src to dst; hold everything (data and EOF) while the gate is closed."""
    try:
        while True:
            gate.wait()
            data = src.recv(BUFFER)
            gate.wait()
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src, dst)


def _connect(client: socket.socket, upstream: tuple[str, int], gate: Gate) -> None:
    gate.wait()  # a cut link: the connection hangs, as a SYN lost in a split would
    try:
        server = socket.create_connection(upstream, timeout=5)
    except OSError:
        _close(client)
        return
    server.settimeout(None)
    for src, dst in ((client, server), (server, client)):
        threading.Thread(target=_pump, args=(src, dst, gate), daemon=True).start()


def _serve(listener: socket.socket, upstream: tuple[str, int], gate: Gate) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_connect, args=(client, upstream, gate), daemon=True).start()


def parse(spec: str) -> tuple[int, tuple[str, int]]:
    """``LOCALPORT=HOST:PORT`` -> (local port, (host, port))."""
    local, _, target = spec.partition("=")
    host, _, port = target.rpartition(":")
    if not local or not host or not port:
        raise ValueError(f"bad link {spec!r}: want LOCALPORT=HOST:PORT")
    return int(local), (host, int(port))


def main(argv: list[str]) -> int:
    links = [parse(spec) for spec in argv]
    if not links:
        print("usage: python -m meshpush.local.faultproxy LOCALPORT=HOST:PORT ...", file=sys.stderr)
        return 2
    gate = Gate()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            gate.cut()
            print("cut", flush=True)
        elif signum == signal.SIGUSR2:
            gate.heal()
            print("healed", flush=True)
        else:
            stop.set()

    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    for local, upstream in links:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", local))
        listener.listen(128)
        threading.Thread(target=_serve, args=(listener, upstream, gate), daemon=True).start()
    print("listening", flush=True)  # every port bound (LocalCluster waits for this line)
    while not stop.is_set():
        stop.wait(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
