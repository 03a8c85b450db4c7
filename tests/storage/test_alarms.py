"""Alarm lifecycle: raised by meter_events in the same transaction, de-duplicated while open,
acknowledged and closed along TRANSITIONS, auto-closed after the condition cleared."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from storage import alarms
from storage.events import write_events
from storage.health import write_health
from storage.rows import EventRow, HealthRow

T0 = datetime(2026, 3, 1, 8, tzinfo=UTC)


async def _meter(pool: asyncpg.Pool, tenant_id: int, address: str) -> int:
    meter_id: int = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, 'water', 'cjt188')"
        " RETURNING meter_id",
        tenant_id,
        address,
    )
    return meter_id


async def _events(pool: asyncpg.Pool, rows: list[EventRow]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await write_events(conn, rows)


async def _types(pool: asyncpg.Pool, alarm_id: int) -> list[str]:
    rows = await pool.fetch(
        "SELECT event_type FROM alarm_events WHERE alarm_id = $1 ORDER BY seq", alarm_id
    )
    return [r["event_type"] for r in rows]


async def test_raised_once_while_open_and_replay_raises_nothing(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Three leak events open one alarm (occurrences 3, one alarm.opened); a replay adds none."""
    m = await _meter(pool, tenant_id, "al1")
    rows = [EventRow(m, T0 + timedelta(hours=h), "leak", T0) for h in range(3)]
    await _events(pool, rows)
    await _events(pool, rows)  # the replayed uplink: ON CONFLICT DO NOTHING, no trigger
    [alarm] = await alarms.list_alarms(pool, tenant_id, meter_id=m)
    assert (alarm["kind"], alarm["state"], alarm["occurrences"]) == ("leak", "open", 3)
    assert (alarm["severity"], alarm["opened_at"]) == ("major", T0)
    assert alarm["last_seen_at"] == T0 + timedelta(hours=2)
    assert await _types(pool, alarm["alarm_id"]) == ["alarm.opened"]


async def test_rolled_back_uplink_raises_nothing(pool: asyncpg.Pool, tenant_id: int) -> None:
    """The alarm and its event exist only if the transaction that stored the event commits."""
    m = await _meter(pool, tenant_id, "al2")
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await write_events(conn, [EventRow(m, T0, "burst", T0)])
        await tx.rollback()
    assert await alarms.list_alarms(pool, tenant_id, meter_id=m) == []


@pytest.mark.parametrize(("state", "action"), list(alarms.TRANSITIONS))
def test_every_transition_is_allowed(state: alarms.State, action: alarms.Action) -> None:
    """Each edge of TRANSITIONS gives its next state and event."""
    new, event = alarms.next_state(state, action)
    assert new in alarms.STATES
    assert event.startswith("alarm.")


@pytest.mark.parametrize(
    ("state", "action"),
    [("closed", "acknowledge"), ("closed", "close"), ("acknowledged", "acknowledge")],
)
def test_forbidden_transitions_raise(state: alarms.State, action: alarms.Action) -> None:
    """Edges not in TRANSITIONS are refused with AlarmStateError."""
    with pytest.raises(alarms.AlarmStateError):
        alarms.next_state(state, action)


async def test_acknowledge_then_close_by_hand(pool: asyncpg.Pool, tenant_id: int) -> None:
    """open -> acknowledged (key, note, time) -> closed (manual); each logs its event; a new
    event after closing opens a new alarm (one from before the close does not)."""
    m = await _meter(pool, tenant_id, "al3")
    await _events(pool, [EventRow(m, T0, "tamper", T0)])
    [a] = await alarms.list_alarms(pool, tenant_id, meter_id=m)
    acked = await alarms.transition(
        pool, tenant_id, a["alarm_id"], "acknowledge", key_id="0123456789ab", note="crew sent"
    )
    assert (acked["state"], acked["acked_by"], acked["ack_note"]) == (
        "acknowledged", "0123456789ab", "crew sent",
    )  # fmt: skip
    assert acked["acked_at"] is not None
    with pytest.raises(alarms.AlarmStateError):
        await alarms.transition(pool, tenant_id, a["alarm_id"], "acknowledge", key_id=None)
    closed = await alarms.transition(
        pool, tenant_id, a["alarm_id"], "close", key_id="0123456789ab", note="seal replaced"
    )
    assert (closed["state"], closed["close_reason"]) == ("closed", "manual")
    assert await _types(pool, a["alarm_id"]) == [
        "alarm.opened", "alarm.acknowledged", "alarm.closed",
    ]  # fmt: skip
    await _events(pool, [EventRow(m, T0 + timedelta(days=1), "tamper", T0)])
    assert await alarms.list_alarms(pool, tenant_id, meter_id=m) == []  # older than the close
    await _events(pool, [EventRow(m, datetime.now(UTC) + timedelta(minutes=1), "tamper", T0)])
    assert len(await alarms.list_alarms(pool, tenant_id, meter_id=m)) == 1  # the new one
    with pytest.raises(alarms.AlarmNotFoundError):
        await alarms.transition(pool, tenant_id + 10_000, a["alarm_id"], "close", key_id=None)


async def test_auto_close_after_the_condition_cleared(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A reading without the flag clears the alarm; the sweep closes it once it stayed
    cleared for the rule's auto_close_after_s, not before; interval rows are no evidence."""
    m = await _meter(pool, tenant_id, "al4")
    await alarms.set_rule(pool, tenant_id, "leak", auto_close_after_s=3600)
    await _events(pool, [EventRow(m, T0, "leak", T0)])
    await pool.executemany(
        "INSERT INTO readings (meter_id, read_s, register_ml, flags)"
        " VALUES ($1, nbm_floor_s($2), 1000, $3)",
        [(m, T0, 8), (m, T0 + timedelta(hours=1), 2048), (m, T0 + timedelta(hours=2), 0)],
    )
    assert await alarms.sweep(pool, T0 + timedelta(hours=2, minutes=30)) == (1, 0)
    [a] = await alarms.list_alarms(pool, tenant_id, meter_id=m)
    assert a["cleared_at"] == T0 + timedelta(hours=2)  # not the INTERVAL row at +1 h
    assert await alarms.sweep(pool, T0 + timedelta(hours=3)) == (0, 1)
    [closed] = await alarms.list_alarms(pool, tenant_id, meter_id=m, states=["closed"])
    assert (closed["close_reason"], closed["closed_by"]) == ("cleared", None)
    # a late event from before the clearing does not reopen it
    await _events(pool, [EventRow(m, T0 + timedelta(minutes=30), "leak", T0)])
    assert await alarms.list_alarms(pool, tenant_id, meter_id=m) == []


async def test_flag_again_before_auto_close_keeps_it_open(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A new event after the clearing resets cleared_at: the sweep does not close it."""
    m = await _meter(pool, tenant_id, "al5")
    await _events(pool, [EventRow(m, T0, "leak", T0)])
    await pool.execute(
        "INSERT INTO readings (meter_id, read_s, register_ml, flags)"
        " VALUES ($1, nbm_floor_s($2), 1000, 0)",
        m,
        T0 + timedelta(hours=1),
    )
    await alarms.sweep(pool, T0 + timedelta(hours=1, minutes=5))
    await _events(pool, [EventRow(m, T0 + timedelta(hours=2), "leak", T0)])
    [a] = await alarms.list_alarms(pool, tenant_id, meter_id=m)
    assert (a["cleared_at"], a["occurrences"]) == (None, 2)
    assert await alarms.sweep(pool, T0 + timedelta(days=5)) == (0, 0)


async def test_rules_disable_severity_and_battery_threshold(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A disabled kind raises nothing; severity is the tenant's; a battery under the
    tenant's threshold raises low_battery from device_health."""
    m = await _meter(pool, tenant_id, "al6")
    await alarms.set_rule(pool, tenant_id, "dry", enabled=False)
    await alarms.set_rule(pool, tenant_id, "leak", severity="critical")
    await alarms.set_rule(pool, tenant_id, "low_battery", threshold=3100)
    await _events(pool, [EventRow(m, T0, "dry", T0), EventRow(m, T0, "leak", T0)])
    async with pool.acquire() as conn:
        await write_health(conn, [HealthRow(m, T0, 3200, None, None, None, T0)])
        await write_health(
            conn, [HealthRow(m, T0 + timedelta(hours=1), 3050, None, None, None, T0)]
        )
    got = {a["kind"]: a["severity"] for a in await alarms.list_alarms(pool, tenant_id, meter_id=m)}
    assert got == {"leak": "critical", "low_battery": "warning"}
    effective = {r["kind"]: r for r in await alarms.rules(pool, tenant_id)}
    assert effective["dry"]["enabled"] is False
    assert effective["low_battery"]["threshold"] == 3100
