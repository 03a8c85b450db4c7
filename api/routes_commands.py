"""Command routes: the downlink mailbox (storage.mailbox) per meter, per state, in bulk.

A command waits, durably, until its meter is next heard from; the collector sends it in
that window and records the device's answer. Follow it at /v1/commands/{id}; a bulk
request answers 202 with a job to follow at /v1/command-jobs/{id}.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from api.cursors import decode_cursor, encode_cursor
from api.deps import CONFLICT, PROBLEMS, MeterId, Pool, Reader, Writer
from api.errors import NotFoundError, UnprocessableError
from api.schemas_commands import (
    BulkCommand,
    Command,
    CommandJob,
    CommandPage,
    CommandState,
    NewCommand,
)
from storage import mailbox
from storage.pool import connection

router = APIRouter(prefix="/v1", tags=["commands"], responses=PROBLEMS)
CommandId = Annotated[int, Path(ge=1, le=2**63 - 1, description="command id", examples=[1])]
JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="command job id", examples=[1])]
Cursor = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Limit = Annotated[int, Query(ge=1, le=1000)]


def created_by(key_id: str) -> str:
    """How a command records the API key that asked for it."""
    return f"api-key:{key_id}"


def command_out(cmd: mailbox.Command) -> Command:
    """The API view of a command."""
    return Command.model_validate(cmd, from_attributes=True)


def _page(cmds: list[mailbox.Command], limit: int) -> CommandPage:
    more = len(cmds) == limit
    return CommandPage(
        items=[command_out(c) for c in cmds],
        next_cursor=encode_cursor(cmds[-1].command_id) if more and cmds else None,
    )


@router.post(
    "/meters/{meter_id}/commands",
    status_code=201,
    responses={**CONFLICT, 200: {"description": "the idempotency key's command, unchanged"}},
    summary="Queue a command for a meter",
)
async def create_command(
    meter_id: MeterId, body: NewCommand, who: Writer, pool: Pool, response: Response
) -> Command:
    """Queue it; it cancels a queued earlier command for the same setting (that one's
    reason becomes `superseded_by=<this id>`). 200 with the same command when the
    idempotency key was used already with this body; 409 when with another."""
    async with connection(pool, "queueing a command") as conn:
        cmd, created = await mailbox.create(
            conn,
            tenant_id=who.tenant_id,
            meter_id=meter_id,
            kind=body.kind,
            args=body.args,
            ttl_s=body.ttl_s,
            created_by=created_by(who.key_id),
            idempotency_key=body.idempotency_key,
        )
    if not created:
        response.status_code = 200
    return command_out(cmd)


@router.get("/meters/{meter_id}/commands", summary="A meter's commands")
async def meter_commands(
    meter_id: MeterId,
    who: Reader,
    pool: Pool,
    state: CommandState | None = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> CommandPage:
    """The meter's commands in delivery order (id), optionally in one state."""
    cmds = await mailbox.list_commands(
        pool,
        who.tenant_id,
        meter_id=meter_id,
        state=state,
        after=decode_cursor(cursor),
        limit=limit,
    )
    return _page(cmds, limit)


@router.get("/commands", summary="The tenant's commands")
async def list_commands(
    who: Reader,
    pool: Pool,
    state: CommandState | None = None,
    meter_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    job_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> CommandPage:
    """Commands in id order, filtered by state, meter or bulk job."""
    cmds = await mailbox.list_commands(
        pool,
        who.tenant_id,
        meter_id=meter_id,
        state=state,
        job_id=job_id,
        after=decode_cursor(cursor),
        limit=limit,
    )
    return _page(cmds, limit)


@router.get("/commands/{command_id}", summary="One command")
async def get_command(command_id: CommandId, who: Reader, pool: Pool) -> Command:
    """The command with its state, attempts, reason and the device's answer."""
    cmd = await mailbox.get(pool, who.tenant_id, command_id)
    if cmd is None:
        raise NotFoundError(f"no command {command_id}")
    return command_out(cmd)


@router.post("/commands/{command_id}/cancel", responses=CONFLICT, summary="Cancel a queued command")
async def cancel_command(command_id: CommandId, who: Writer, pool: Pool) -> Command:
    """Cancel it (reason `cancelled_by=api-key:<id>`); 409 once it was sent (the device
    may be executing it: queue the opposite command instead)."""
    async with connection(pool, "cancelling a command") as conn:
        cmd = await mailbox.cancel(conn, who.tenant_id, command_id, created_by(who.key_id))
    if cmd is None:
        raise NotFoundError(f"no command {command_id}")
    return command_out(cmd)


@router.post(
    "/commands/bulk", status_code=202, responses=CONFLICT, summary="One command to many meters"
)
async def bulk_command(body: BulkCommand, who: Writer, pool: Pool) -> CommandJob:
    """Queue the command for every meter of a list (ids or addresses) or a query, as one
    job; 422 names meters that do not exist or cannot take it. The same idempotency key
    again answers the same job."""
    given = [k for k in ("meter_ids", "addresses", "query") if getattr(body, k) is not None]
    if len(given) != 1:
        msg = "give exactly one of meter_ids, addresses, query"
        raise UnprocessableError(msg)
    value = getattr(body, given[0])
    selection = {given[0]: value.model_dump(exclude_none=True) if given[0] == "query" else value}
    async with connection(pool, "queueing a bulk command") as conn:
        job, _ = await mailbox.bulk(
            conn,
            tenant_id=who.tenant_id,
            kind=body.kind,
            args=body.args,
            selection=selection,
            ttl_s=body.ttl_s,
            created_by=created_by(who.key_id),
            idempotency_key=body.idempotency_key,
        )
    return CommandJob.model_validate(job, from_attributes=True)


@router.get("/command-jobs/{job_id}", summary="A bulk job's progress")
async def get_job(job_id: JobId, who: Reader, pool: Pool) -> CommandJob:
    """Its commands counted per state; list them at /v1/commands?job_id=."""
    job = await mailbox.get_job(pool, who.tenant_id, job_id)
    if job is None:
        raise NotFoundError(f"no command job {job_id}")
    return CommandJob.model_validate(job, from_attributes=True)
