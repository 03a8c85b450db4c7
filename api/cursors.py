"""Opaque page cursors: one base64url codec for every paged route.

A cursor is a position, never a tenant or a filter: a tag naming the kind of position and
its parts (ids, times in µs, a time zone) joined by `|`, base64url without padding.
`encode(tag, *parts)` makes one; `decode(cursor, tag, count)` reads one back, raising
UnprocessableError (422) for anything this API did not hand out: bad base64, another
tag, another number of parts. `encode_cursor` / `decode_cursor` are the common case, the
id a page ends at.
"""

from __future__ import annotations

import base64
import binascii

from api.errors import UnprocessableError

_SEP = "|"
_BIGINT = 2**63


def invalid() -> UnprocessableError:
    """The 422 for a cursor this API did not hand out."""
    return UnprocessableError("invalid cursor: pass next_cursor from the previous page unchanged")


def encode(tag: str, *parts: int | str) -> str:
    """The cursor of the position `parts` (none may contain `|`) of kind `tag`."""
    raw = tag + _SEP.join(str(p) for p in parts)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(cursor: str, tag: str, count: int) -> list[str]:
    """The `count` parts of a cursor of kind `tag`; UnprocessableError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise invalid() from exc
    parts = raw[len(tag) :].split(_SEP)
    if not raw.startswith(tag) or len(parts) != count:
        raise invalid()
    return parts


def bigint(part: str) -> int:
    """A cursor part that must be a non-negative bigint; UnprocessableError else."""
    try:
        value = int(part)
    except ValueError as exc:
        raise invalid() from exc
    if not 0 <= value < _BIGINT:
        raise invalid()
    return value


def encode_cursor(after: int) -> str:
    """An opaque cursor for 'after this id'."""
    return encode("m", after)


def decode_cursor(cursor: str | None) -> int:
    """The id a cursor points after (0 for none); UnprocessableError if it is not ours."""
    return bigint(decode(cursor, "m", 1)[0]) if cursor else 0
