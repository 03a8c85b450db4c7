"""`send_all` on real UDP sockets: no answer is a kept report resent on the next wake-up,
not a failure of the run; the simulator's own exceptions end the run as they are."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest

from simulator import frames
from simulator.faults import Outcome
from simulator.fleet import FleetSpec, Transport
from simulator.runner import RunConfig, send_all
from simulator.schedule import Uplink, build_schedule
from simulator.truth import build_truth

TRUTH = build_truth(FleetSpec(meters=30, days=4, seed=2))
METER = next(m.index for m in TRUTH.meters if m.transport is Transport.COAP_CON)
REPORTS = [u for u in build_schedule(TRUTH) if u.meter == METER]


class Collector(asyncio.DatagramProtocol):
    """A CoAP peer that drops the first `silent` datagrams, then answers every CON 2.04."""

    def __init__(self, silent: int) -> None:
        self.silent, self.seen = silent, 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        """Keep the socket."""
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Drop while silent, else piggyback 2.04 Changed on the ACK."""
        self.seen += 1
        if self.seen <= self.silent or self.transport is None:
            return
        msg = aiocoap.Message.decode(data)
        ack = aiocoap.Message(
            _mtype=aiocoap.ACK, code=aiocoap.CHANGED, _mid=msg.mid, _token=msg.token
        )
        self.transport.sendto(ack.encode(), addr)


@pytest.fixture
async def collector(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Collector, int]]:
    """The peer on a free loopback port; `silent` comes from the test's parameter."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Collector(request.param), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    yield proto, transport.get_extra_info("sockname")[1]
    transport.close()


def _config(port: int) -> RunConfig:
    # a hundredth of RFC 7252 timing: the five transmissions of a CON take about a second
    return RunConfig(coap_port=port, plain_coap=True, concurrency=4, time_scale=0.01, sockets=1)


@pytest.mark.parametrize("collector", [5], indirect=True)
async def test_unanswered_report_is_resent_on_the_next_wake_up(
    collector: tuple[Collector, int],
) -> None:
    """The first report's five transmissions go unanswered: it is kept, resent before the
    second report and acknowledged; the run counts one timeout and is not a failure."""
    peer, port = collector
    first, second = REPORTS[:2]
    summary = await send_all(TRUTH, [first, second], {}, _config(port), progress=False)
    assert summary.timeouts == 1
    assert summary.results[first.seq] == "timeout"
    (again,) = summary.resends
    assert (again.resend_of, again.first_h, again.last_h) == (
        first.seq,
        first.first_h,
        first.last_h,
    )
    assert summary.results[again.seq] == "acked"
    assert summary.results[second.seq] == "acked"
    assert summary.unacked == {}
    assert summary.ok
    assert [u.seq for u in summary.uplinks([first, second])] == [first.seq, second.seq, again.seq]
    assert peer.seen == 5 + 2


@pytest.mark.parametrize("collector", [10**6], indirect=True)
async def test_a_report_never_answered_is_counted_not_failed(
    collector: tuple[Collector, int],
) -> None:
    """The last report gets no answer, nor does its resend after the run: one report stays
    unacknowledged (category timeout), the run is still ok."""
    _, port = collector
    last = REPORTS[-1]
    summary = await send_all(TRUTH, [last], {}, _config(port), progress=False)
    assert summary.timeouts == 2
    assert len(summary.resends) == 1
    assert summary.unacked == {"timeout": 1}
    assert summary.rejected == {}
    assert summary.ok
    assert any(line.startswith("unacknowledged 1") for line in summary.lines())


@pytest.mark.parametrize("collector", [0], indirect=True)
async def test_a_simulator_exception_ends_the_run_as_it_is(
    collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception raised inside the simulator is raised by send_all itself (a bug with
    its traceback), never counted as the collector's answer."""
    _, port = collector
    real = frames.encode

    def encode(truth: Any, up: Uplink, registers: Any, keys: Any = None) -> bytes:
        if up.seq == REPORTS[1].seq:
            raise ValueError("simulated bug in an encoder")
        return real(truth, up, registers, keys)

    monkeypatch.setattr(frames, "encode", encode)
    with pytest.raises(ValueError, match="simulated bug"):
        await send_all(TRUTH, REPORTS[:3], {}, _config(port), progress=False)


def test_reports_here_are_clean() -> None:
    """The fixtures' meter reports are plain stored reports (no fault, no emulated loss)."""
    assert len(REPORTS) >= 2
    assert all(u.outcome is Outcome.STORED and not u.fault for u in REPORTS)
