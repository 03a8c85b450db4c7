"""The simulated fleet: N meters with a format, a transport, a register and a reporting time.

`build_fleet(spec)` is pure and reproducible: the same `FleetSpec` (seed included) always
yields the same meters. Nothing here touches the network, the clock or the file system.

Registers are exact integers. A register moves only in its smallest unit (`unit_ml`):
1 L for a litre register (scale -3), 10 L for CJ/T 188's 0.01 m3 (scale -2). It rolls over
at `10 ** digits` units (CJ/T 188: 999999.99 m3; OMS BCD8 in litres: 99999.999 m3).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ML_PER_M3 = 1_000_000
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86_400
#: 2025-01-01T00:00:00Z, the default day 0 of a simulation (a Wednesday)
DEFAULT_START_S = 1_735_689_600


class Kind(enum.StrEnum):
    """What the meter measures (the `meters.kind` column)."""

    WATER = "water"
    GAS = "gas"


class Format(enum.StrEnum):
    """The payload format of the meter's uplinks (the `meters.format` column)."""

    CJT188 = "cjt188"
    OMS = "oms"
    SENML = "senml"
    INTERVAL = "interval"


class Transport(enum.StrEnum):
    """How the meter's uplinks travel."""

    COAP_CON = "coap-con"
    COAP_NON = "coap-non"
    MQTT_QOS0 = "mqtt-qos0"
    MQTT_QOS1 = "mqtt-qos1"
    COAP_DTLS = "coap-dtls"  # CON over a DTLS-PSK session the device keeps open
    PLATFORM_ONENET = "platform-onenet"  # through an operator platform's HTTP push

    @property
    def is_coap(self) -> bool:
        """True for the two plain/OSCORE CoAP message types (raw UDP in the simulator)."""
        return self in (Transport.COAP_CON, Transport.COAP_NON)

    @property
    def is_mqtt(self) -> bool:
        """True for the two MQTT QoS levels."""
        return self in (Transport.MQTT_QOS0, Transport.MQTT_QOS1)

    @property
    def answers_refusals(self) -> bool:
        """True when the collector's refusal reaches the device (MQTT acknowledges a
        quarantined message: the device learns nothing)."""
        return not self.is_mqtt


@dataclass(frozen=True)
class RegisterSpec:
    """A register layout: its smallest digit as a power of ten of m3, and its digit count."""

    scale: int
    digits: int

    @property
    def unit_ml(self) -> int:
        """Millilitres per smallest register step (scale -3 gives 1000 mL = 1 L)."""
        return int(10 ** (self.scale + 6))  # scale >= -6: an int (int ** int is typed Any)

    @property
    def modulus_units(self) -> int:
        """The register rolls over to 0 when it reaches this many units."""
        return int(10**self.digits)


# What each format's register looks like on the wire (FORMATS.md §1.2, §2.3, §5).
REGISTERS: dict[Format, RegisterSpec] = {
    Format.CJT188: RegisterSpec(scale=-2, digits=8),  # XXXXXX.XX m3, BCD
    Format.OMS: RegisterSpec(scale=-3, digits=8),  # VIF 0x13 litres, BCD8
    Format.SENML: RegisterSpec(scale=-3, digits=9),  # m3 with 3 decimals in JSON
    Format.INTERVAL: RegisterSpec(scale=-3, digits=9),  # nbm1: uint32 litres
}

# Which formats each kind of meter comes in, and their shares (weights, normalised).
FORMAT_MIX: dict[Kind, dict[Format, float]] = {
    Kind.WATER: {Format.CJT188: 0.35, Format.OMS: 0.25, Format.SENML: 0.2, Format.INTERVAL: 0.2},
    Kind.GAS: {Format.CJT188: 0.5, Format.OMS: 0.3, Format.SENML: 0.2},
}

# Most hourly readings one uplink of each format can carry (FORMATS.md §5): a CJ/T 188
# 901F reply holds one register (the midnight freeze), an interval batch a base register
# and 23 deltas; OMS and SenML packs can hold a day and more.
BATCH_CAPACITY: dict[Format, int] = {
    Format.CJT188: 1,
    Format.OMS: 1,
    Format.SENML: 48,
    Format.INTERVAL: 24,
}

# The earliest instant each format's clock field can show: a reset real-time clock restarts
# there. EN 13757-3 type F/G/I dates count years from 2000 (OMS); CJ/T 188 writes a
# four-digit BCD year and SenML and nbm1 carry Unix time, so their clocks restart at 1970.
CLOCK_EPOCH_S: dict[Format, int] = {
    Format.CJT188: 0,
    Format.OMS: 946_684_800,  # 2000-01-01T00:00:00Z
    Format.SENML: 0,
    Format.INTERVAL: 0,
}

TRANSPORT_MIX: dict[Transport, float] = {
    Transport.COAP_CON: 0.4,
    Transport.COAP_NON: 0.15,
    Transport.MQTT_QOS1: 0.35,
    Transport.MQTT_QOS0: 0.1,
}


@dataclass(frozen=True)
class FleetSpec:
    """What to simulate: fleet size, period, seed and the mixes. Times are UTC epoch seconds.

    `report_window_s` is the span after midnight in which each meter's daily uplink time is
    drawn (peak shifting); `gas_share` is the fraction of gas meters.
    """

    meters: int = 200
    days: int = 40
    seed: int = 1
    start_s: int = DEFAULT_START_S
    gas_share: float = 0.3
    report_window_s: tuple[int, int] = (1 * SECONDS_PER_HOUR, 5 * SECONDS_PER_HOUR)
    tenant: str = "sim"
    # shares of the fleet moved to DTLS-PSK CoAP and to an operator platform (OneNET push),
    # drawn from a stream of their own: with both 0 the fleet is the same as without them
    dtls_share: float = 0.0
    platform_share: float = 0.0

    def __post_init__(self) -> None:
        """Reject impossible specs early, with the field that is wrong."""
        if self.meters < 1:
            raise ValueError(f"meters must be >= 1, got {self.meters}")
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.start_s % SECONDS_PER_DAY:
            raise ValueError("start_s must be a UTC midnight")
        if (
            not 0 <= self.dtls_share + self.platform_share <= 1
            or min(self.dtls_share, self.platform_share) < 0
        ):
            raise ValueError("dtls_share and platform_share must be >= 0 and sum to <= 1")
        lo, hi = self.report_window_s
        if not 0 <= lo < hi <= SECONDS_PER_DAY:
            raise ValueError(f"report window {self.report_window_s} is not within one day")

    @property
    def hours(self) -> int:
        """Number of simulated hours (the truth holds hours + 1 register values)."""
        return self.days * 24


@dataclass(frozen=True)
class Meter:
    """One physical meter at one service point.

    `installed_h`/`removed_h` bound the hours (inclusive) in which the meter is on the
    service point; an exchange ends one meter and starts the next at the same hour.
    `initial_units` is the register at `installed_h` in register units.
    """

    index: int
    address: str
    service_point: str
    kind: Kind
    format: Format
    transport: Transport
    register: RegisterSpec
    report_offset_s: int
    seed: int
    initial_units: int
    installed_h: int
    removed_h: int
    oms_key: bytes | None = None
    household_size: float = 1.0

    @property
    def unit_ml(self) -> int:
        """Millilitres per register step."""
        return self.register.unit_ml

    @property
    def initial_ml(self) -> int:
        """Register at installation in millilitres (as displayed, below the modulus)."""
        return (self.initial_units % self.register.modulus_units) * self.unit_ml


@dataclass(frozen=True)
class Fleet:
    """The spec and its meters; `meters[i].index == i`. Exchanges append new meters."""

    spec: FleetSpec
    meters: tuple[Meter, ...] = field(default_factory=tuple)

    def by_address(self) -> dict[str, Meter]:
        """Meters keyed by their address."""
        return {m.address: m for m in self.meters}


def address_for(fmt: Format, prefix: int, index: int) -> str:
    """The address a meter of `fmt` reports: CJ/T 188 14 digits, OMS 8 digits, else a name."""
    if fmt in (Format.CJT188, Format.INTERVAL):
        return f"{prefix:07d}{index:07d}"
    if fmt is Format.OMS:
        return f"{prefix % 100:02d}{index:06d}"
    if fmt is Format.SENML:
        return f"urn:dev:nbm:{prefix:07d}-{index:06d}"
    raise ValueError(f"no address scheme for {fmt}")


def _pick(rng: np.random.Generator, mix: Mapping[Any, float], n: int) -> list[int]:
    weights = np.array(list(mix.values()), dtype=np.float64)
    return [int(i) for i in rng.choice(len(mix), size=n, p=weights / weights.sum())]


def build_fleet(spec: FleetSpec) -> Fleet:
    """The meters of `spec`, reproducibly from `spec.seed` (no faults applied yet)."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0xF1EE7]))
    n = spec.meters
    prefix = int(rng.integers(1_000_000, 10_000_000))
    is_gas = rng.random(n) < spec.gas_share
    lo, hi = spec.report_window_s
    offsets = rng.integers(lo, hi, size=n)
    seeds = rng.integers(0, 2**31, size=n)
    sizes = rng.lognormal(mean=0.0, sigma=0.35, size=n)
    transports = list(TRANSPORT_MIX)
    transport_pick = _pick(rng, dict(TRANSPORT_MIX), n)
    moved = np.random.default_rng([spec.seed, 0xD715]).random(n)
    water_formats, gas_formats = list(FORMAT_MIX[Kind.WATER]), list(FORMAT_MIX[Kind.GAS])
    water_pick = _pick(rng, dict(FORMAT_MIX[Kind.WATER]), n)
    gas_pick = _pick(rng, dict(FORMAT_MIX[Kind.GAS]), n)
    keys = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    # an installed meter has already counted something: 0 to ~2000 m3
    initial_m3 = rng.integers(0, 2000, size=n)
    meters = []
    for i in range(n):
        kind = Kind.GAS if is_gas[i] else Kind.WATER
        fmt = gas_formats[gas_pick[i]] if kind is Kind.GAS else water_formats[water_pick[i]]
        reg = REGISTERS[fmt]
        meters.append(
            Meter(
                index=i,
                address=address_for(fmt, prefix, i),
                service_point=f"sp-{prefix:07d}-{i:06d}",
                kind=kind,
                format=fmt,
                transport=_moved(transports[transport_pick[i]], float(moved[i]), spec),
                register=reg,
                report_offset_s=int(offsets[i]),
                seed=int(seeds[i]),
                initial_units=int(initial_m3[i]) * ML_PER_M3 // reg.unit_ml,
                installed_h=0,
                removed_h=spec.hours,
                oms_key=bytes(keys[i]) if fmt is Format.OMS else None,
                household_size=float(sizes[i]),
            )
        )
    return Fleet(spec=spec, meters=tuple(meters))


def _moved(transport: Transport, draw: float, spec: FleetSpec) -> Transport:
    if draw < spec.dtls_share:
        return Transport.COAP_DTLS
    if draw < spec.dtls_share + spec.platform_share:
        return Transport.PLATFORM_ONENET
    return transport


def meter_prefix(fleet: Fleet) -> int:
    """The fleet-wide numeric prefix used in addresses (recovered from meter 0)."""
    return int(fleet.meters[0].service_point.split("-")[1])
