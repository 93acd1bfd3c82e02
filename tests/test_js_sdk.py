"""The JavaScript SDK (clients/js): its own unit tests, then end to end against a real cluster.

The end-to-end scenario runs the SDK in headless Chromium (Debian's ``chromium`` driven by
``playwright-core``) on a page served from 127.0.0.1, and once more in Node.js with ``ws``:
the SDK connects through a node that does not own the user (a redirect), messages stream in,
the owner node is SIGKILLed mid-stream, and every published message must arrive exactly once,
in seq order, with an unbroken ``prev`` chain. Without node/npm or chromium these tests skip
with a message naming what to install; ``.ci/run`` installs both, so CI never skips them.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from conftest import make_cluster

from meshpush.core.auth import issue_token
from meshpush.local.devcluster import LocalCluster, NodeProc

JS_DIR = Path(__file__).resolve().parent.parent / "clients" / "js"
Event = dict[str, Any]


def _missing(why: str) -> NoReturn:
    """Skip, except where MESHPUSH_NO_SKIP is set (.ci/run): CI must never skip these."""
    if os.environ.get("MESHPUSH_NO_SKIP"):
        pytest.fail(why)
    pytest.skip(why)


def _need(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} not found: {install}")
    return path


@pytest.fixture(scope="module")
def node_bin() -> str:
    node = _need("node", "install Node.js >= 20 (apt-get install -y nodejs npm)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        _missing(f"node {version.stdout.strip()} is too old: install Node.js >= 20")
    return node


@pytest.fixture(scope="module")
def js_modules(node_bin: str) -> Path:
    """clients/js/node_modules from package-lock.json (npm ci), unless already up to date."""
    npm = _need("npm", "install npm (apt-get install -y npm)")
    stamp = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return JS_DIR / "node_modules"


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    _missing("chromium not found: apt-get install -y chromium (Debian's package)")


@pytest.fixture(scope="module")
def page_server() -> Iterator[str]:
    """clients/js served over HTTP on 127.0.0.1 (a module script needs a real origin)."""
    handler = functools.partial(_QuietHandler, directory=str(JS_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_js_unit_tests(node_bin: str) -> None:
    done = subprocess.run(
        [node_bin, "--test", "test/client.test.js"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout


def test_js_types_compile(node_bin: str, js_modules: Path) -> None:
    """src/index.d.ts is valid TypeScript and fits real use (test/types.ts, tsc --strict)."""
    tsc = js_modules / "typescript" / "bin" / "tsc"
    done = subprocess.run(
        [node_bin, str(tsc), "-p", "tsconfig.json"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_js_package_is_npm_ready(node_bin: str) -> None:
    """`npm pack` ships the module, its types and README, and no runtime dependency."""
    npm = _need("npm", "install npm (apt-get install -y npm)")
    done = subprocess.run(
        [npm, "pack", "--dry-run", "--json"], cwd=JS_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    packed = sorted(f["path"] for f in json.loads(done.stdout)[0]["files"])
    assert packed == ["README.md", "package.json", "src/index.d.ts", "src/index.js"]
    package = json.loads((JS_DIR / "package.json").read_text())
    assert "dependencies" not in package and package["type"] == "module"


# ---------------------------------------------------------------- end to end


class Driver:
    """clients/js/e2e/driver.mjs in a subprocess; its JSON-line events collected by a thread."""

    def __init__(self, node_bin: str, config: dict[str, Any], log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [node_bin, "e2e/driver.mjs", json.dumps(config)],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,  # its own process group: the browser goes with it
        )
        self.events: list[Event] = []
        self._new: queue.Queue[None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "garbage", "line": line}
            self.events.append(event | {"_t": time.monotonic()})
            self._new.put(None)

    def of(self, kind: str) -> list[Event]:
        return [e for e in list(self.events) if e.get("event") == kind]

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            fatal = self.of("fatal") + self.of("pageerror")
            assert not fatal, fatal
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"gave up waiting for {what}: {self}"
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(left, 0.5))

    def stop(self) -> Event:
        """Close stdin (the driver closes its client) and return its final stats."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        finally:
            self.kill()
        self._reader.join(5)
        done = self.of("done")
        assert done, f"driver ended without stats: {self}"
        return done[-1]["stats"]  # type: ignore[no-any-return]

    def kill(self) -> None:
        """Stop the driver and everything it started (Chromium): TERM, then KILL the group."""
        for signum, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
                break
        self._log.close()

    def __str__(self) -> str:
        kinds = [e for e in self.events if e.get("event") != "message"]
        return f"events (messages left out): {kinds[-30:]}"


class Publisher(threading.Thread):
    """Publishes ``total`` messages for one user through one node, one after another; the
    second half waits for ``resume`` (set once the test has killed a node), so the kill always
    falls mid-stream, however slow the machine."""

    def __init__(
        self, cluster: LocalCluster, via: NodeProc, user: str, total: int, pause: float = 0.02
    ) -> None:
        super().__init__(daemon=True)
        self.cluster, self.via, self.user, self.total = cluster, via, user, total
        self.pause = pause
        self.published: list[tuple[int, str]] = []  # (seq, id)
        self.error: BaseException | None = None
        self.resume = threading.Event()

    def run(self) -> None:
        headers = {"authorization": f"Bearer {self.cluster.api_key}"}
        try:
            with httpx.Client(base_url=self.via.http_url, headers=headers, timeout=10) as http:
                for i in range(self.total):
                    if i == self.total // 2:
                        assert self.resume.wait(60), "never told to go on"
                    body = {"user": self.user, "id": f"e2e-{i}", "data": {"n": i}}
                    resp = http.post("/v1/publish", json=body)
                    assert resp.status_code == 202, resp.text
                    self.published.append((resp.json()["seq"], body["id"]))
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by the test
            self.error = exc


def owner_of(cluster: LocalCluster, user: str) -> NodeProc:
    resp = httpx.get(f"{cluster.live()[0].http_url}/v1/route", params={"user": user}, timeout=5)
    assert resp.status_code == 200, resp.text
    return cluster.node(resp.json()["node"])


def assert_exactly_once(messages: list[Event], publisher: Publisher) -> None:
    assert [(m["seq"], m["id"]) for m in messages] == publisher.published  # once, in order
    assert [m["data"]["n"] for m in messages] == list(range(publisher.total))
    assert all(after["prev"] == before["seq"] for before, after in itertools.pairwise(messages))


def failover_scenario(
    cluster: LocalCluster, node_bin: str, config: dict[str, Any], log: Path
) -> None:
    """Stream messages to the SDK, SIGKILL the owner mid-stream: all arrive once, in order."""
    user, total = f"e2e-{config['mode']}", 80
    owner = owner_of(cluster, user)
    others = [n for n in cluster.live() if n is not owner]
    # start at a node that does not own the user: the SDK must follow a redirect first
    config |= {
        "urls": [others[0].ws_url, owner.ws_url, others[1].ws_url],
        "token": issue_token(cluster.token_secret, user, 600),
        "device": "d1",
    }
    driver = Driver(node_bin, config, log)
    try:
        driver.wait("welcome", lambda: bool(driver.of("welcome")), timeout=60)
        assert driver.of("welcome")[0]["node"] == owner.id
        publisher = Publisher(cluster, others[0], user, total)
        publisher.start()
        driver.wait("first messages", lambda: len(driver.of("message")) >= 20, timeout=30)
        cluster.kill(owner)
        killed_at = time.monotonic()
        publisher.resume.set()
        publisher.join(60)
        assert publisher.error is None, publisher.error
        driver.wait("every message", lambda: len(driver.of("message")) >= total, timeout=45)
        stats = driver.stop()
    finally:
        driver.kill()
    assert_exactly_once(driver.of("message"), publisher)
    welcomes = [e["node"] for e in driver.of("welcome")]
    assert welcomes[0] == owner.id and welcomes[-1] != owner.id, welcomes
    assert not driver.of("chain_break") and not driver.of("gap"), driver
    assert stats["redirects"] >= 1, stats
    back = min(e["_t"] for e in driver.of("welcome")[1:]) - killed_at
    print(f"{config['mode']}: welcomed again {back:.2f}s after the kill; stats {stats}")


@pytest.mark.cluster
def test_browser_sdk_survives_owner_kill(
    fresh_cluster: LocalCluster,
    node_bin: str,
    js_modules: Path,
    chromium: str,
    page_server: str,
    tmp_path: Path,
) -> None:
    config = {"mode": "browser", "page": f"{page_server}/e2e/page.html", "chromium": chromium}
    failover_scenario(fresh_cluster, node_bin, config, tmp_path / "driver.log")


@pytest.mark.cluster
def test_node_sdk_survives_owner_kill(
    fresh_cluster: LocalCluster, node_bin: str, js_modules: Path, tmp_path: Path
) -> None:
    """The token goes in the first frame (the SDK's default), never in a URL."""
    config = {"mode": "node", "auth": "frame"}
    failover_scenario(fresh_cluster, node_bin, config, tmp_path / "driver.log")


@pytest.mark.cluster
def test_node_sdk_refreshes_tokens_before_expiry(
    node_bin: str, js_modules: Path, tmp_path: Path
) -> None:
    """3 s tokens, no leeway: the SDK moves onto fresh tokens and is never cut with 4401;
    it pings at the welcome's interval and the node answers."""
    with make_cluster(tmp_path / "cluster", nodes=2, token_leeway=0) as cluster:
        user, first = "e2e-refresh", cluster.live()[0]
        config = {
            "mode": "node",
            "urls": [n.ws_url for n in cluster.live()],
            "secret": cluster.token_secret,
            "user": user,
            "ttl": 3,
            "refreshBefore": 1,
            "device": "d1",
            "auth": "query",  # the other way in: the token in the URL
        }
        driver = Driver(node_bin, config, tmp_path / "driver.log")
        try:
            driver.wait("welcome", lambda: bool(driver.of("welcome")), timeout=60)
            publisher = Publisher(cluster, first, user, total=30, pause=0.25)
            publisher.resume.set()
            publisher.run()  # about 8 s: several token lifetimes
            assert publisher.error is None, publisher.error
            driver.wait("every message", lambda: len(driver.of("message")) >= 30, timeout=30)
            stats = driver.stop()
        finally:
            driver.kill()
    assert_exactly_once(driver.of("message"), publisher)
    assert stats["tokenRefreshes"] >= 2, stats
    assert stats["pings"] >= 2, stats  # {"type":"ping"} at the welcome's 1 s interval
    assert len(driver.of("token_refresh")) == stats["tokenRefreshes"]
    assert not [e for e in driver.of("close") if e["code"] == 4401], driver
