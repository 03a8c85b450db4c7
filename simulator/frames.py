"""Uplink payloads: each scheduled uplink as the bytes its meter's format puts on the wire.

`encode(truth, uplink, registers)` builds the frame with the decoder package's encoders
(the pure inverses of the decoders), so what the simulator sends is exactly what
`decoder.decode_batch` must read back. Per format:

- CJ/T 188: a DI 901F reply with the midnight-freeze register, the meter's RTC set to
  that instant (Beijing local time, as the decoder reads it), ST valve/battery bits;
- OMS: a mode 5 (AES-128-CBC) wM-Bus frame with the register, a type F clock and the STS
  battery bit, under the meter's own key;
- SenML: an LwM2M 3424 pack (`decoder.encode_senml`) with every hour of the batch and
  resources 10/11/13 for leak, back-flow and tamper at the hours they are active, and the
  modem's health (`simulator.modem`) as LwM2M objects 3 and 4;
- interval: our `nbm1` v2 layout (`decoder.interval.encode_interval`): base register and
  hourly deltas in litres, one status: the alarms latched since the previous report and
  the valve's position at the newest hour (the decoder puts it on the newest reading), and
  the modem's health block.

Corruption (`uplink.corrupt`) cuts the frame in half: a truncated frame fails every
format's length, checksum, JSON or ciphertext check, so it must be quarantined.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import numpy.typing as npt

from decoder.columns import Flag
from decoder.encode_cjt188 import encode_cjt188
from decoder.encode_senml import encode_senml, water_pack
from decoder.interval import encode_interval
from decoder.mbus_encode import encode_oms_mode5
from simulator import modem
from simulator.fleet import Format, Kind, Meter
from simulator.schedule import Uplink
from simulator.truth import Truth

OMS_MANUFACTURER = "NBM"
OMS_VERSION = 0x01
OMS_DEVICE_TYPE = {Kind.WATER: 0x07, Kind.GAS: 0x03}  # EN 13757-3 device types
CJT188_TYPE = {Kind.WATER: 0x10, Kind.GAS: 0x30}
CJT188_ST_VALVE_CLOSED = 0x01  # ST byte0 D1D0 = 01 (ng-gateway di_types.rs)
CJT188_ST_BATTERY_LOW = 0x04  # ST byte0 D2
OMS_STS_POWER_LOW = 0x04  # EN 13757-7 status byte


@dataclass(frozen=True)
class Reading:
    """One hourly register as the meter labels it: its own clock, register, status bits."""

    read_at_s: int
    register_ml: int
    flags: int


def readings(truth: Truth, uplink: Uplink, registers: npt.NDArray[np.int64]) -> list[Reading]:
    """The readings the frame carries, stamped with the device's clock (truth + offset)."""
    start = truth.fleet.spec.start_s
    row = registers[uplink.meter]
    flags = truth.flags[uplink.meter]
    return [
        Reading(start + h * 3600 + uplink.clock_offset_s, int(row[h]), int(flags[h]))
        for h in uplink.hours
    ]


def _when(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _cjt188(m: Meter, address: str, rs: list[Reading], seq: int) -> bytes:
    last = rs[-1]
    status = CJT188_ST_VALVE_CLOSED if last.flags & Flag.VALVE_CLOSED else 0
    status |= CJT188_ST_BATTERY_LOW if last.flags & Flag.LOW_BATTERY else 0
    return encode_cjt188(
        address=address,
        total_ml=last.register_ml,
        meter_type=CJT188_TYPE[m.kind],
        clock=_when(last.read_at_s),
        status=status,
        ser=seq & 0xFF,
    )


def _oms(m: Meter, address: str, rs: list[Reading], seq: int) -> bytes:
    last = rs[-1]
    assert m.oms_key is not None, "OMS meters always have a key"
    return encode_oms_mode5(
        address,
        OMS_MANUFACTURER,
        OMS_VERSION,
        OMS_DEVICE_TYPE[m.kind],
        seq & 0xFF,
        last.register_ml,
        m.oms_key,
        _when(last.read_at_s),
        status=OMS_STS_POWER_LOW if last.flags & Flag.LOW_BATTERY else 0,
    )


# LwM2M 3424 resources that carry a status bit (decoder.senml): 10 leak detected,
# 11 back-flow detected, 13 fraud detected
SENML_FLAG_RESOURCES = ((Flag.LEAK, "10"), (Flag.REVERSE_FLOW, "11"), (Flag.TAMPER, "13"))


def _senml(m: Meter, address: str, rs: list[Reading], seq: int) -> bytes:
    records: list[dict[str, object]] = list(
        water_pack(address, [(r.read_at_s, r.register_ml) for r in rs])
    )
    t0 = rs[0].read_at_s
    for r in rs:
        for flag, resource in SENML_FLAG_RESOURCES:
            if r.flags & flag:
                records.append({"n": resource, "t": r.read_at_s - t0, "vb": True})
    records.extend(_lwm2m_health(m, address, rs[-1], rs[-1].read_at_s - t0))
    return encode_senml(records)


def _lwm2m_health(m: Meter, address: str, last: Reading, t: int) -> list[dict[str, object]]:
    """LwM2M objects 3 (battery mV, %) and 4 (RSRP dBm, SINR dB, cell id, CE level)."""
    h = modem.health(m, last.read_at_s // 3600, last.flags)
    assert h.battery_mv is not None, "simulator.modem always reports a battery"
    assert h.rsrp_cdbm is not None, "and radio figures"
    assert h.sinr_cdb is not None, "and radio figures"
    pct = max(0, min(100, (h.battery_mv - 3000) * 100 // (modem.FRESH_MV - 3000)))
    return [
        {"bn": f"{address}/", "n": "3/0/7", "t": t, "v": h.battery_mv},
        {"n": "3/0/9", "t": t, "v": pct},
        {"n": "4/0/2", "t": t, "v": Decimal(h.rsrp_cdbm).scaleb(-2)},
        {"n": "4/0/11", "t": t, "v": Decimal(h.sinr_cdb).scaleb(-2)},
        {"n": "4/0/8", "t": t, "v": h.cell_id},
        {"n": "4/0/13", "t": t, "v": h.ecl},
    ]


_VALVE = int(Flag.VALVE_CLOSED)


def _interval(m: Meter, address: str, rs: list[Reading], seq: int) -> bytes:
    # nbm1: base register + whole-litre hourly deltas and one status word (the decoder
    # puts it on the newest reading). The meter latches an alarm until it has reported
    # it, as Kamstrup and IZAR meters report current and previous alarms (FORMATS §5):
    # with only the status of the newest hour, a burst of a few hours between two daily
    # reports would never reach the backend.
    # a drifting clock still freezes at its own whole hours: the base time is whole too
    # The valve is a state, not an alarm: the status tells its position at the newest hour
    # (latched, a valve reopened in the batch's first hour would read closed at its end,
    # on a day the meter registered flow).
    regs = [r.register_ml for r in rs]
    latched = 0
    for r in rs:
        latched |= r.flags
    latched = latched & ~_VALVE | rs[-1].flags & _VALVE
    return encode_interval(
        address,
        (rs[0].read_at_s + 1800) // 3600 * 3600,
        regs[0],
        [b - a for a, b in itertools.pairwise(regs)],
        status=latched,
        health=modem.health(m, rs[-1].read_at_s // 3600, latched),  # nbm1 v2
    )


ENCODERS: dict[Format, Callable[[Meter, str, list[Reading], int], bytes]] = {
    Format.CJT188: _cjt188,
    Format.OMS: _oms,
    Format.SENML: _senml,
    Format.INTERVAL: _interval,
}


def encode(
    truth: Truth, uplink: Uplink, registers: npt.NDArray[np.int64],
    oms_keys: Mapping[int, bytes] | None = None,
) -> bytes:  # fmt: skip
    """The payload of `uplink`, as its sender's format puts it on the wire.

    `registers` is `truth.register_ml()` (passed in so a run computes it once);
    `oms_keys` the OMS AES keys a rotate_key gave meters during the run (by index).
    """
    sender = truth.meters[uplink.meter]
    if oms_keys and uplink.meter in oms_keys:
        sender = dataclasses.replace(sender, oms_key=oms_keys[uplink.meter])
    claimed = truth.meters[uplink.claimed]
    payload = ENCODERS[sender.format](
        sender, claimed.address, readings(truth, uplink, registers), uplink.seq
    )
    return payload[: len(payload) // 2] if uplink.corrupt else payload
