"""GET /v1/meters/{meter_id}/uplinks: a meter's recent raw uplinks with the decoder's
frame flags by name, newest first, within the tenant only."""

from __future__ import annotations

from datetime import timedelta

from apihelpers import utc

from decoder.columns import FrameFlag
from storage.archive import ArchiveWriter
from storage.rows import RawUplink

T0 = utc(2026, 11, 30)


async def test_recent_uplinks_show_flags_by_name(api, make_tenant, add_meter, pool):
    """Each uplink shows its bytes, transport, outcome, decoder error and flag names
    (null when not decoded); `limit` keeps the newest; another tenant's key gets 404."""
    a, b = await make_tenant(), await make_tenant()
    meter = await add_meter(a.tenant_id)
    flags = int(FrameFlag.NO_DATA | FrameFlag.TRAILING_JUNK)
    await ArchiveWriter(pool).write_uplinks([
        RawUplink(T0, a.tenant_id, meter, 2, "[::1]:1", b"\x01\x02", "mbus", "stored", 2, 2,
                  None, None, flags),
        RawUplink(T0 + timedelta(minutes=1), a.tenant_id, meter, 3, None, b"\xff", None,
                  "quarantined", 0, 0, 7, "crc: checksum mismatch", None),
        RawUplink(T0 + timedelta(minutes=2), a.tenant_id, meter, 1, None, b"\xab\xcd\xef",
                  "cjt188", "stored", 1, 1, None, None, 0),
    ])  # fmt: skip
    r = await api.get(f"/v1/meters/{meter}/uplinks", headers=a.reader)
    assert r.status_code == 200, r.text
    got = [(u["payload_hex"], u["transport"], u["size_bytes"], u["outcome"], u["error_code"],
            u["decode_flags"]) for u in r.json()]  # fmt: skip
    assert got == [
        ("abcdef", "coap", 3, "stored", None, []),
        ("ff", "mqtt", 1, "quarantined", 7, None),
        ("0102", "coap+oscore", 2, "stored", None, ["no_data", "trailing_junk"]),
    ]
    r = await api.get(f"/v1/meters/{meter}/uplinks?limit=1", headers=a.reader)
    assert [u["payload_hex"] for u in r.json()] == ["abcdef"]
    assert (await api.get(f"/v1/meters/{meter}/uplinks", headers=b.reader)).status_code == 404
    assert (await api.get(f"/v1/meters/{meter}/uplinks")).status_code == 401
    bad = await api.get(f"/v1/meters/{meter}/uplinks?limit=0", headers=a.reader)
    assert bad.status_code == 422
