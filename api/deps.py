"""What the routers share: auth aliases, the pool, path types, cursors, problem responses.

Routers import this module and never each other; it imports no router.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import Depends, Path

from api.auth import get_pool, require
from api.errors import PROBLEM_JSON, NotFoundError, UnprocessableError
from api.schemas import IsoDay, Problem
from storage import pool as storage_pool
from storage import registry
from storage.apikeys import Principal
from storage.pool import Executor, Record

Pool = Annotated[storage_pool.Pool, Depends(get_pool)]
Reader = Annotated[Principal, Depends(require("readings:read"))]
Writer = Annotated[Principal, Depends(require("meters:write"))]
Admin = Annotated[Principal, Depends(require("admin"))]

PROBLEM_RESPONSE: dict[str, Any] = {
    "model": Problem,
    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    s: {**PROBLEM_RESPONSE, "description": d}
    for s, d in (
        (401, "no or invalid API key"),
        (403, "the key lacks the scope"),
        (404, "no such resource for this tenant"),
        (422, "invalid request"),
    )
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {**PROBLEM_RESPONSE, "description": "state conflict"}
}

MeterId = Annotated[int, Path(ge=1, le=2**63 - 1, description="meter id", examples=[1])]
CycleId = Annotated[
    IsoDay, Path(description="local date the cycle starts on", examples=["2024-03-01"])
]


async def get_or_404(conn: Executor, tenant_id: int, meter_id: int) -> Record:
    """The tenant's meter row, or NotFoundError."""
    row = await registry.get_meter(conn, tenant_id, meter_id)
    if row is None:
        raise NotFoundError(f"no meter {meter_id}")
    return row


def encode_cursor(after: int) -> str:
    """An opaque cursor for 'after this id'."""
    return base64.urlsafe_b64encode(f"m{after}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The id a cursor points after (0 for none); UnprocessableError if it is not ours."""
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        value = int(raw[1:]) if raw.startswith("m") else -1
    except (ValueError, UnicodeDecodeError):
        value = -1
    if not 0 <= value < 2**63:
        msg = "invalid cursor: pass next_cursor from the previous page unchanged"
        raise UnprocessableError(msg)
    return value
