"""The reference WebSocket servers the benchmarks measure meshpush against, in the same run.

Each reference is a process that listens on 127.0.0.1:PORT, sends every new connection one
small welcome text frame (so a client knows it is registered), holds it, and prints
``ready PORT``. A line ``broadcast K SIZE`` on its stdin makes it send K messages of the
meshpush broadcast shape (``{"type":"msg","ch":"broadcast",...,"data":"xxx..."}`` with SIZE
bytes of data) to every connection, then print ``done``.

- ``raw``: plain nonblocking stdlib sockets on ``selectors``; each message is framed once and
  the same bytes go to every socket (what does not fit waits for writability): the floor.
- ``trio-websocket``: ``serve_websocket`` and ``send_message`` per connection (meshpush's stack).
- ``websockets``: Python ``websockets`` (asyncio), ``broadcast()``; installed by the bench into
  the cache folder when it is not importable.
- ``node-ws``: Node.js ``ws`` 8 (bench/ws_server.js), ``client.send`` per connection with one
  pre-made Buffer; installed with npm into the cache folder.

    python -m bench._servers raw|trio-websocket|websockets PORT
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("MESHPUSH_BENCH_CACHE", Path.home() / ".cache" / "meshpush-bench"))
WELCOME = '{"type":"welcome"}'
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
NODE_WS = "ws@8"
PY_WEBSOCKETS = "websockets>=13"
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]


def message(seq: int, size: int) -> str:
    """One broadcast frame's text, shaped like meshpush's ``msg`` frame."""
    return json.dumps(
        {"type": "msg", "ch": "broadcast", "seq": seq, "id": f"b{seq}", "data": "x" * size},
        separators=(",", ":"),
    )


def server_frame(text: str) -> bytes:
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


# ---------------------------------------------------------------- raw sockets (the floor)


class RawServer:
    """Accept, upgrade, greet; on a trigger send one pre-encoded frame to every socket."""

    def __init__(self, port: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", port), backlog=4096)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
        self.pending: dict[socket.socket, bytearray] = {}  # bytes waiting for the handshake
        self.open: dict[socket.socket, bytearray] = {}  # outbound bytes that did not fit

    def run(self) -> None:
        print(f"ready {self.listener.getsockname()[1]}", flush=True)
        while True:
            for key, events in self.sel.select():
                if key.data == "accept":
                    self.accept()
                elif key.data == "stdin":
                    line = sys.stdin.readline()
                    if not line:
                        return
                    self.command(line)
                elif events & selectors.EVENT_WRITE:
                    self.flush(key.fileobj)  # type: ignore[arg-type]
                else:
                    self.read(key.fileobj)  # type: ignore[arg-type]

    def accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                sock, _ = self.listener.accept()
                sock.setblocking(False)
                self.pending[sock] = bytearray()
                self.sel.register(sock, selectors.EVENT_READ, "conn")

    def read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.drop(sock)
            return
        if sock in self.pending:
            buf = self.pending[sock]
            buf += data
            if b"\r\n\r\n" in buf:
                del self.pending[sock]
                self.upgrade(sock, bytes(buf))
        # frames from clients (pongs, closes) are ignored: the floor only sends

    def upgrade(self, sock: socket.socket, request: bytes) -> None:
        key = b""
        for line in request.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open[sock] = bytearray()
        self.send(sock, response + server_frame(WELCOME))

    def send(self, sock: socket.socket, data: bytes) -> None:
        out = self.open[sock]
        if out:
            out += data
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.drop(sock)
            return
        if sent < len(data):
            out += data[sent:]
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "conn")

    def flush(self, sock: socket.socket) -> None:
        out = self.open.get(sock)
        if out is None:
            return
        try:
            sent = sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(sock)
            return
        del out[:sent]
        if not out:
            self.sel.modify(sock, selectors.EVENT_READ, "conn")

    def drop(self, sock: socket.socket) -> None:
        self.pending.pop(sock, None)
        self.open.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        sock.close()

    def command(self, line: str) -> None:
        _, count, size = line.split()
        for seq in range(1, int(count) + 1):
            frame = server_frame(message(seq, int(size)))
            for sock in list(self.open):
                self.send(sock, frame)
        print("done", flush=True)


# ---------------------------------------------------------------- trio-websocket


def run_trio_websocket(port: int) -> None:
    import trio
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    conns: set[Any] = set()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await ws.send_message(WELCOME)
            conns.add(ws)
            while True:
                await ws.get_message()
        except ConnectionClosed:
            pass
        finally:
            conns.discard(ws)

    async def commands() -> None:
        stdin = trio.wrap_file(sys.stdin)
        while line := await stdin.readline():
            _, count, size = line.split()
            for seq in range(1, int(count) + 1):
                text = message(seq, int(size))
                for ws in list(conns):
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send_message(text)
            print("done", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
            print(f"ready {port}", flush=True)
            await commands()
            nursery.cancel_scope.cancel()

    trio.run(main)


# ---------------------------------------------------------------- websockets (asyncio)


def run_websockets(port: int) -> None:
    import asyncio

    from websockets.asyncio.server import ServerConnection, broadcast, serve

    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        await ws.send(WELCOME)
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
            print(f"ready {port}", flush=True)
            while line := await reader.readline():
                _, count, size = line.split()
                for seq in range(1, int(count) + 1):
                    broadcast(conns, message(seq, int(size)))
                    await asyncio.sleep(0)
                print("done", flush=True)

    asyncio.run(main())


# ---------------------------------------------------------------- installing the references


class Unavailable(Exception):
    """A reference cannot run here (say what to install)."""


def websockets_path() -> Path | None:
    """A folder to put on PYTHONPATH for ``websockets`` (None: importable as is)."""
    try:
        import websockets  # noqa: F401

        return None
    except ImportError:
        pass
    target = CACHE / "python"
    if not (target / "websockets").exists():
        print(f"bench: installing {PY_WEBSOCKETS} into {target}", file=sys.stderr)
        result = subprocess.run(
            [*PIP_INSTALL, "--target", str(target), PY_WEBSOCKETS],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode:
            raise Unavailable(f"pip install {PY_WEBSOCKETS} failed: {result.stderr[-500:]}")
    return target


def node_ws_modules() -> Path:
    """The node_modules folder holding ``ws`` 8 (npm-installed into the cache on first use)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise Unavailable("Node.js and npm are not installed (apt-get install nodejs npm)")
    folder = CACHE / "node"
    if not (folder / "node_modules" / "ws" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"bench: npm install {NODE_WS} into {folder}", file=sys.stderr)
        result = subprocess.run(
            [
                npm,
                "install",
                "--silent",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(folder),
                NODE_WS,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode:
            raise Unavailable(f"npm install {NODE_WS} failed: {result.stderr[-500:]}")
    return folder / "node_modules"


class Reference:
    """A reference server process: start, trigger broadcasts, stop."""

    KINDS = ("node-ws", "websockets", "trio-websocket", "raw")

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        env = dict(os.environ)
        if kind == "node-ws":
            env["NODE_PATH"] = str(node_ws_modules())
            argv = ["node", str(Path(__file__).with_name("ws_server.js")), str(port)]
        else:
            if kind == "websockets" and (extra := websockets_path()) is not None:
                env["PYTHONPATH"] = os.pathsep.join(
                    filter(None, [str(extra), env.get("PYTHONPATH")])
                )
            argv = [sys.executable, "-m", "bench._servers", kind, str(port)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        line = self.readline(60)
        if not line.startswith("ready"):
            self.stop()
            raise Unavailable(f"{kind} server did not start (said {line!r})")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(0.5):
                sel.close()
                return self.proc.stdout.readline().strip()
            if self.proc.poll() is not None:
                break
        sel.close()
        return ""

    def broadcast(self, count: int, size: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"broadcast {count} {size}\n")
        self.proc.stdin.flush()

    def wait_done(self, timeout: float = 300) -> None:
        line = self.readline(timeout)
        if line != "done":
            raise RuntimeError(f"{self.kind} did not finish its broadcast (said {line!r})")

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    if kind == "raw":
        RawServer(port).run()
    elif kind == "trio-websocket":
        run_trio_websocket(port)
    elif kind == "websockets":
        run_websockets(port)
    else:
        raise SystemExit(f"unknown reference {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
