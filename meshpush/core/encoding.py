"""Safe encoding of user and device ids for NATS subjects and KV keys, and the id rules.

Ids are arbitrary UTF-8 strings of 1..256 bytes without control characters: no character of
Unicode category ``Cc`` (U+0000..U+001F, U+007F..U+009F, so also U+0085 NEXT LINE). The rule
is :func:`check_id`, used wherever an id enters (API, handshake, token). In a subject or key
ids become unpadded base64url (``A-Z a-z 0-9 - _``), which NATS accepts in both, so ``.``,
``*``, ``>``, spaces and emoji cannot change the meaning of a subject.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re

MAX_ID_BYTES = 256
#: every character of Unicode category Cc (C0, DEL, C1): one regex search instead of a
#: category lookup per character (an id is checked for every item of a publish request)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class BadId(ValueError):
    """An id is empty, longer than 256 bytes in UTF-8, or has a control character (``Cc``)."""


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid user/device id, else raise :class:`BadId`."""
    if not isinstance(value, str):
        raise BadId(f"{what} must be a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadId(f"{what} is not valid UTF-8") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise BadId(f"{what} must be 1..{MAX_ID_BYTES} bytes of UTF-8")
    if CONTROL.search(value):
        raise BadId(f"{what} must not contain control characters (Unicode category Cc)")
    return value


def encode_token(value: str) -> str:
    """Encode an id as one subject/key token."""
    return base64.urlsafe_b64encode(value.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_token(token: str) -> str:
    """Inverse of :func:`encode_token`; raises :class:`BadId` on garbage."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadId("not an encoded id") from None


#: users recur (every message names one): the users seen lately are kept with their tokens
#: (a republished message's subject names its user; the store keeps whole subjects; bounded)
USER_TOKENS = 65_536
user_of_token = functools.lru_cache(maxsize=USER_TOKENS)(decode_token)
