"""Logging setup of a node: plain text (default) or one JSON object per line (``log_format``).

JSON lines carry ``time``, ``level``, ``node``, ``logger``, ``event`` (the message) and, when a
log call names a session, ``session`` (its id) and ``user_hash`` (a short SHA-256 of the user
id, never the id itself); lines logged by a WebSocket connection's own task (its session
included) carry ``client_ip``, the client's address (behind trusted proxies, the one they
forwarded); text lines end with `` [client <ip>]`` unless the message already names it. In
both formats the node's secrets (API keys, token secrets) and anything shaped like a JWT are
replaced by ``[redacted]`` before a line is written, and a session is shown by its id and user
hash only. Message bodies are never logged by meshpush.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO, runtime_checkable

from meshpush.settings import Settings

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
# header.payload.signature, each base64url; a JWT header always starts with {" = eyJ
# the client address of the connection whose task is running (set by the listener)
CLIENT_IP: ContextVar[str | None] = ContextVar("client_ip", default=None)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@runtime_checkable
class SessionLike(Protocol):
    """What a log call's argument needs to be shown as a session
    (:class:`meshpush.server.sessions.Session`)."""

    id: int
    user: str


def user_hash(user: str) -> str:
    """A stable, short, one-way name for a user id: lets logs be correlated, not read."""
    return hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class _SessionRef:
    """Stands in for a session argument: ``%r``/``%s`` print its id and user hash only."""

    def __init__(self, session: SessionLike) -> None:
        self.id, self.user_hash = session.id, user_hash(session.user)

    def __repr__(self) -> str:
        return f"<Session {self.id} user#{self.user_hash}>"

    __str__ = __repr__


class Redactor(logging.Filter):
    """Rewrites every record: sessions to ids + user hashes, secrets and JWTs to [redacted]."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # longest first, so a secret that contains another is replaced whole
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return _JWT.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        sessions = []
        if isinstance(record.args, tuple):
            args = []
            for arg in record.args:
                if isinstance(arg, SessionLike):
                    arg = _SessionRef(arg)
                    sessions.append(arg)
                args.append(arg)
            record.args = tuple(args)
        client_ip = CLIENT_IP.get()
        if client_ip is not None and not hasattr(record, "client_ip"):
            record.client_ip = client_ip
        if sessions and not hasattr(record, "session"):
            record.session, record.user_hash = sessions[0].id, sessions[0].user_hash
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, plus `` [client <ip>]`` on a connection's lines that do not name it."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        client_ip = getattr(record, "client_ip", None)
        if client_ip is None or client_ip in record.getMessage():
            return line
        head, newline, rest = line.partition("\n")  # before a traceback, if any
        return f"{head} [client {client_ip}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "node": self.node,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key in ("session", "user_hash", "client_ip"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_text:  # filled (and scrubbed) by the Redactor
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def setup(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger for a node; raises ValueError on a bad format or level."""
    if settings.log_format not in FORMATS:
        raise ValueError(f"bad value for log_format: {settings.log_format!r} (text or json)")
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"bad value for log_level: {settings.log_level!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(
        Redactor([*settings.api_keys, settings.token_secret, *settings.token_old_secrets])
    )
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(settings.node_id))
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
