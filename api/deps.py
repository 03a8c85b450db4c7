"""What the routers share: auth aliases, the pool, path types, problem responses.

Routers import this module and never each other; it imports no router.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path

from api.auth import get_pool, require
from api.errors import PROBLEM_JSON, NotFoundError
from api.schemas import IsoDay, Problem
from storage import pool as storage_pool
from storage import registry
from storage.apikeys import Principal
from storage.pool import Executor

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


async def get_or_404(conn: Executor, tenant_id: int, meter_id: int) -> registry.MeterRow:
    """The tenant's meter row, or NotFoundError."""
    row = await registry.get_meter(conn, tenant_id, meter_id)
    if row is None:
        raise NotFoundError(f"no meter {meter_id}")
    return row
