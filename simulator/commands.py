"""A simulated meter's side of the downlink mailbox: execute each command once, answer.

`CommandExecutor.handle(envelope, now_s)` takes the envelope the collector sent in the
meter's window (`decoder.commands`: JSON, commands in order) and returns the answer to
send (JSON bytes for CoAP `POST /c` or the MQTT result topic), or None for a meter of the
`mute` fault class, which executes but never answers (its commands must end `expired`).
A command id is executed at most once: a repeat (the collector resends a command until
it is answered) is answered from memory, as real meters must.

A CJ/T 188 meter acts on the write frame, as the real one does (A017 value 55 open / 99
close; A015 sets its clock) and answers with its reply frame; the project's own
interval/SenML devices act on `args`. The effects land in `MeterState`: a closed valve
(the frames then carry the valve flag and no consumption), the clock offset (a set clock
has none left), the reporting interval and time.

`sim run --commands N` drives it (`simulator.command_run`): commands queued through the
API, each 2.04's payload (or MQTT down message) handed here, the answer posted to `/c`
(or published on the result topic), the truth changed from the hour a command executed.
A rotate_key keeps the key it carried in the state: the OMS AES key, or the new OSCORE
context (any format: it is the modem's, not the meter's); the run switches the meter to
it from then on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from decoder.cjt188 import BEIJING_UTC_OFFSET_S
from decoder.commands import cjt188_reply

_VALVE = {0x55: False, 0x99: True}  # A017 value -> valve closed
_DI_VALVE, _DI_CLOCK = b"\xa0\x17", b"\xa0\x15"
_ST_VALVE_CLOSED = 0x01  # ST byte0 D1D0 = 01


@dataclass
class MeterState:
    """What commands change on a meter."""

    valve_closed: bool = False
    clock_offset_s: int = 0  # the meter's clock minus the true time
    interval_s: int = 3600
    report_time: str | None = None
    aes_key: bytes | None = None  # the OMS key a rotate_key gave it (None: its first)
    oscore: dict[str, str] | None = None  # the OSCORE context a rotate_key gave it


@dataclass
class CommandExecutor:
    """One meter's command handling (see the module docstring)."""

    address: str
    meter_format: str
    state: MeterState = field(default_factory=MeterState)
    mute: bool = False  # the fault class that never answers
    executed: Counter[int] = field(default_factory=Counter)
    memory: dict[int, dict[str, Any]] = field(default_factory=dict)

    def handle(self, envelope: bytes, now_s: int) -> bytes | None:
        """Execute the envelope's new commands (at `now_s`, the true time); the answer to
        send, or None (nothing to answer, or a mute meter)."""
        if not envelope:
            return None
        body = json.loads(envelope)
        answers = []
        for cmd in body["cmds"]:
            cid = int(cmd["id"])
            if cid not in self.memory:
                self.executed[cid] += 1
                self.memory[cid] = self._execute(cmd, now_s)
            answers.append(self.memory[cid])
        if self.mute or not answers:
            return None
        return json.dumps(answers, separators=(",", ":")).encode()

    def _execute(self, cmd: dict[str, Any], now_s: int) -> dict[str, Any]:
        if self.meter_format == "cjt188" and cmd["kind"] != "rotate_key":
            return self._cjt188(cmd, now_s)
        kind, args = cmd["kind"], cmd["args"]
        if kind == "valve":
            self.state.valve_closed = args["action"] == "close"
        elif kind == "clock":
            self.state.clock_offset_s = int(args["utc_s"]) - now_s
        elif kind == "rotate_key" and "aes_key" in args:
            self.state.aes_key = bytes.fromhex(args["aes_key"])
        elif kind == "rotate_key" and "oscore" in args:
            self.state.oscore = dict(args["oscore"])
        elif kind == "reporting":
            self.state.interval_s = int(args.get("interval_s", self.state.interval_s))
            self.state.report_time = args.get("report_time", self.state.report_time)
        else:
            return {"id": cmd["id"], "ok": False, "result": {"error": f"unknown {kind}"}}
        return {"id": cmd["id"], "ok": True, "result": {"valve_closed": self.state.valve_closed}}

    def _cjt188(self, cmd: dict[str, Any], now_s: int) -> dict[str, Any]:
        request = bytes.fromhex(cmd["frame"])
        body = request[request.find(b"\x68") :]
        ok = bytes.fromhex(self.address)[::-1] == body[2:9]
        di, data = body[11:13], body[14:-2]
        if ok and di == _DI_VALVE and data[:1] and data[0] in _VALVE:
            self.state.valve_closed = _VALVE[data[0]]
        elif ok and di == _DI_CLOCK and len(data) == 7:
            self.state.clock_offset_s = _clock_s(data) - now_s
        else:
            ok = False
        status = _ST_VALVE_CLOSED if self.state.valve_closed else 0
        reply = cjt188_reply(request, abnormal=not ok, status=status)
        return {"id": cmd["id"], "frame": reply.hex()}


def _clock_s(data: bytes) -> int:
    """UTC seconds of a CJ/T 188 clock `ss mm hh DD MM YY CC` (Beijing local time)."""
    ss, mi, hh, dd, mo, yy, cc = (int(f"{b:02x}") for b in data)
    local = datetime(cc * 100 + yy, mo, dd, hh, mi, ss, tzinfo=UTC)
    return int((local - timedelta(seconds=BEIJING_UTC_OFFSET_S)).timestamp())
