"""Simulated frames carry the modem's health wherever their format can, and it decodes back."""

from __future__ import annotations

import pytest

from collector.health import health_of
from decoder import decode_batch
from simulator import frames, modem
from simulator.faults import Outcome, parse_faults
from simulator.fleet import FleetSpec, Format
from simulator.schedule import build_schedule
from simulator.truth import build_truth

SPEC = FleetSpec(meters=80, days=2, seed=5)
TRUTH = build_truth(SPEC, parse_faults("low_battery=0.3"))
REGISTERS = TRUTH.register_ml()
UPLINKS = [u for u in build_schedule(TRUTH) if u.outcome is Outcome.STORED and not u.corrupt]
# device_health figures each format's frames must yield (CJ/T 188 and OMS: status bits only)
EXPECTED = {
    Format.CJT188: {"battery_low"},
    Format.OMS: {"battery_low", "meter_error"},
    Format.SENML: {"battery_mv", "battery_pct", "rsrp_cdbm", "sinr_cdb", "ecl", "cell_id"},
    Format.INTERVAL: {"battery_mv", "rsrp_cdbm", "sinr_cdb", "ecl", "cell_id", "battery_low"},
}


@pytest.mark.parametrize("fmt", list(Format))
def test_every_format_reports_health(fmt: Format) -> None:
    """Each clean uplink of a format yields the health figures that format can carry."""
    ups = [u for u in UPLINKS if TRUTH.meters[u.meter].format is fmt][:40]
    assert ups, f"no {fmt} uplinks in the simulated fleet"
    keys = {m.address: m.oms_key for m in TRUTH.meters if m.oms_key is not None}
    payloads = [frames.encode(TRUTH, u, REGISTERS) for u in ups]
    dec = decode_batch(payloads, [u.send_s for u in ups], keys=keys)
    assert dec.ok.all(), set(dec.error_message)
    for i, u in enumerate(ups):
        got = {k for k, v in health_of(dec.extra_of(i)).items() if v is not None}
        assert EXPECTED[fmt] <= got, (u, got)
        if fmt in (Format.SENML, Format.INTERVAL):
            assert health_of(dec.extra_of(i))["ecl"] == modem.ecl_of(TRUTH.meters[u.meter])


def test_low_battery_truth_shows_as_low_voltage() -> None:
    """A meter whose truth flags low battery reports a voltage below the low mark."""
    m = TRUTH.meters[0]
    assert modem.health(m, 10, 4).battery_mv is not None
    assert (modem.health(m, 10, 4).battery_mv or 0) < modem.LOW_MV
    assert (modem.health(m, 10, 0).battery_mv or 0) > modem.LOW_MV
