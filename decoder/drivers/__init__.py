"""Drivers as data: vendor payloads described in TOML files, compiled to numpy kernels.

A utility onboarding a new meter model writes a driver file (see `decoder.drivers.spec`
for the schema and `builtin/acme_nb1.toml` for a complete example) instead of code. A
driver is validated when loaded, and its golden `[[example]]` frames are decoded and
compared; a file that fails either is refused with a `DriverError` naming its line.

Two kinds of driver:
- `transport = "wmbus"`: a wireless M-Bus model whose total sits in manufacturer data
  (CI A0-A3, a manufacturer record). `route_mbus` (called first by `decoder.mbus.decode`)
  claims the frames whose header matches (manufacturer, version, device type, CI, a
  payload signature) and decodes them through the driver; all others take the standard
  EN 13757-3 path.
- `transport = "raw"`: an NB-IoT vendor payload recognised by its magic bytes, length and
  checksum; registered as the top-level format `driver`, detected before every other
  format (a magic of 2+ bytes at a fixed offset and a length range is the strongest
  signature we have).

The shipped drivers (`builtin/*.toml`: Diehl IZAR, Apator 08 / 172 / NA-1, Techem
MK Radio 3 / 4, Qundis walk-by CI 78, Zenner 0B, BMT RFM-TX1, and the made-up ACME NB-1
example) are installed at import. `install(driver)` adds one (a duplicate name raises, as a format
key does); the collector installs its drivers directory at start.

Tenants: `install(driver, tenant="slug")` makes a driver apply only within `scope("slug")`
(the collector decodes each tenant's frames in its tenant's scope), so one tenant's
driver never claims another tenant's frames. Unscoped drivers apply everywhere; within a
scope the tenant's own drivers are tried first, so a tenant's file may stand in for a
shipped model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import resources

import numpy as np
import numpy.typing as npt

from decoder import kernels as k
from decoder.columns import Decoded, ErrorCode, concat, empty
from decoder.drivers.kernel import decode_rows
from decoder.drivers.spec import Driver, DriverError, parse_driver
from decoder.mbus_link import manufacturer_code
from decoder.registry import Format, register

__all__ = [
    "Driver",
    "DriverError",
    "check_examples",
    "claims",
    "decode_raw",
    "detect_raw",
    "install",
    "installed",
    "load",
    "named",
    "route_mbus",
    "scope",
    "uninstall",
]

Ints = npt.NDArray[np.int64]
Scoped = tuple[str | None, Driver]  # (tenant, driver): None applies to every tenant
_DRIVERS: dict[tuple[str | None, str], Driver] = {}  # (tenant, name) -> driver
_WMBUS: dict[tuple[str, int], list[Scoped]] = {}  # (manufacturer, CI) -> drivers
_BY_HEADER: dict[bytes, list[Scoped]] = {}  # frame bytes 2, 3 and 10 (M field, CI) -> drivers
_RAW: list[Scoped] = []
_SCOPE: ContextVar[str | None] = ContextVar("driver_scope", default=None)


@contextmanager
def scope(tenant: str | None) -> Iterator[None]:
    """Within it (this thread or task), the drivers installed for `tenant` decode too,
    before the unscoped ones; None: the unscoped drivers only."""
    token = _SCOPE.set(tenant)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _visible(group: Sequence[Scoped]) -> list[Driver]:
    """The drivers of `group` that apply in the current scope, the tenant's own first."""
    here = _SCOPE.get()
    return [d for t, d in group if t is None or t == here]


def named(name: str) -> Driver | None:
    """The driver called `name` that applies in the current scope (the tenant's own
    first), or None."""
    return _DRIVERS.get((_SCOPE.get(), name)) or _DRIVERS.get((None, name))


def installed(tenant: str | None = None) -> tuple[Driver, ...]:
    """The installed drivers of `tenant` (None: the unscoped ones), in installation order."""
    return tuple(d for (t, _), d in _DRIVERS.items() if t == tenant)


def install(driver: Driver, tenant: str | None = None) -> Driver:
    """Make `driver` decode frames from now on (only `tenant`'s, within `scope(tenant)`,
    if given); DriverError if its name is taken in that scope by another driver
    (installing the very same driver again is a no-op)."""
    name = (tenant, driver.name)
    if _DRIVERS.get(name) == driver:
        return driver
    if name in _DRIVERS:
        msg = f"{driver.source}: driver name {driver.name!r} already installed"
        msg += f" (from {_DRIVERS[name].source})"
        raise DriverError(msg)
    _DRIVERS[name] = driver
    entry: Scoped = (tenant, driver)
    groups = [_RAW] if driver.match.transport == "raw" else []
    for man in driver.match.manufacturers:
        for ci in driver.match.ci:
            groups.append(_WMBUS.setdefault((man, ci), []))
            groups += [_BY_HEADER.setdefault(key, []) for key in _header_keys(man, ci)]
    for group in groups:  # a tenant's own drivers are tried before the unscoped ones
        group.insert(0 if tenant is not None else len(group), entry)
    return driver


def _header_keys(man: str, ci: int) -> tuple[bytes, ...]:
    """M field (both values of its top bit, which some meters set) + CI, as frame bytes."""
    code = sum((ord(c) - 64) << s for c, s in zip(man, (10, 5, 0), strict=True))
    return tuple((m.to_bytes(2, "little") + bytes([ci])) for m in (code, code | 0x8000))


def uninstall(name: str, tenant: str | None = None) -> None:
    """Remove an installed driver (tests, a reloaded directory); unknown names are ignored."""
    driver = _DRIVERS.pop((tenant, name), None)
    if driver is None:
        return
    for group in (_RAW, *_WMBUS.values(), *_BY_HEADER.values()):
        group[:] = [e for e in group if e[1] is not driver or e[0] != tenant]


def load(text: str, source: str = "<driver>") -> Driver:
    """Parse, validate and check the golden frames of a driver file; DriverError if not."""
    driver = parse_driver(text, source)
    check_examples(driver)
    return driver


def check_examples(driver: Driver) -> None:
    """Decode every `[[example]]` through `driver` alone; DriverError at the first mismatch."""
    for ex in driver.examples:
        frame = bytes.fromhex(ex.hex)
        keys = {"*": bytes.fromhex(ex.key)} if ex.key else {}
        got = _decode_one(driver, frame, keys)
        where = f"{driver.source} line {ex.line}: example"
        code = ErrorCode(int(got.error_code[0]))
        if ex.reject is not None:
            if code != ex.reject:
                raise DriverError(f"{where} should be refused {ex.reject.name}, got {code.name}")
            continue
        if code != ErrorCode.OK:
            raise DriverError(f"{where} refused {code.name}: {got.error_message[0]}")
        current = got.register_ml[(got.flags & 1 << 10) == 0].tolist()
        billing = got.register_ml[(got.flags & 1 << 10) != 0].tolist()
        if current != [ex.total_ml]:
            raise DriverError(f"{where} total {current} mL, expected {ex.total_ml} mL")
        if ex.target_ml is not None and billing != [ex.target_ml]:
            raise DriverError(f"{where} billing {billing} mL, expected {ex.target_ml} mL")
        if ex.address is not None and str(got.address_of_frame[0]) != ex.address:
            raise DriverError(f"{where} meter id {got.address_of_frame[0]!r}, not {ex.address!r}")
        flags = int(got.flags[0]) & ~(3 << 9)  # clock-missing / billing bits are not alarms
        if flags != ex.flags:
            raise DriverError(f"{where} alarm flags {flags:#x}, expected {ex.flags:#x}")


def _decode_one(driver: Driver, frame: bytes, keys: Mapping[str, bytes]) -> Decoded:
    """One frame through one driver (golden-frame checks)."""
    a = np.frombuffer(frame, np.uint8).reshape(1, -1)
    rx = np.array([1_900_000_000], np.int64)  # after any golden frame's meter clock
    if driver.match.transport == "raw":
        if not _raw_match(driver, a).all():
            return _refused(1, driver.key, ErrorCode.UNKNOWN_FORMAT, "frame does not match")
        return decode_rows(driver, a, rx)
    if not _header_ok(driver, frame):
        return _refused(1, driver.key, ErrorCode.UNKNOWN_FORMAT, "header does not match")
    ids = np.array([_address_of(driver, frame)], object)
    return decode_rows(driver, a, rx, ids, keys)


def _refused(n: int, key: str, code: ErrorCode, message: str) -> Decoded:
    """n frames refused with `code`."""
    out = empty(n)
    out.format[:] = key
    out.error_code[:] = code
    out.error_message[:] = message
    return out


# --- wireless M-Bus: the hook `decoder.mbus.decode` calls first -----------------------


def _link_ok(frame: bytes) -> bool:
    """A CRC-stripped wireless frame: L = len - 1, a SND_NR / SND_IR / RSP_UD C field."""
    n = len(frame)
    return n >= 12 and frame[0] == n - 1 and frame[1] in (0x44, 0x46, 0x08, 0x06)


def _header_ok(d: Driver, frame: bytes) -> bool:
    """Whether `frame` has the manufacturer, version, type, CI, length and payload
    signature `d` matches."""
    m = d.match
    if not _link_ok(frame) or frame[10] not in m.ci:
        return False
    if manufacturer_code(frame[2:4]) not in m.manufacturers:
        return False
    if not m.min_length <= len(frame) <= m.max_length:
        return False
    if (m.versions and frame[8] not in m.versions) or (
        m.device_types and frame[9] not in m.device_types
    ):
        return False
    return not m.magic or frame[11 + m.magic_at : 11 + m.magic_at + len(m.magic)] == m.magic


def _claim(frame: bytes, here: str | None) -> Driver | None:
    """The wmbus driver installed for all or for tenant `here` that claims a CRC-stripped
    frame, or None."""
    group = _BY_HEADER.get(frame[2:4] + frame[10:11])  # one slice and lookup per frame
    if not group:
        return None
    return next((d for t, d in group if (t is None or t == here) and _header_ok(d, frame)), None)


def claims(frame: bytes) -> str | None:
    """The name of the wmbus driver that would decode `frame` in this scope, or None."""
    driver = _claim(frame, _SCOPE.get())
    return None if driver is None else driver.name


def _address_of(driver: Driver, frame: bytes) -> str:
    """The meter id as the vendor prints it."""
    if driver.match.address == "diehl" and frame[2:4] != b"\x30\x4c":  # not SAP
        return frame[6:10][::-1].hex()  # PRIOS: version/type first, then the address
    return frame[4:8][::-1].hex()


def route_mbus(
    frames: Sequence[bytes],
    received_at_s: Ints,
    keys: Mapping[str, bytes] | None,
    cache: object,
    utc_offset_s: int | Ints,
    standard: Callable[..., Decoded],
) -> Decoded | None:
    """Frames a wmbus driver claims, decoded by it, merged with `standard(rest)`.

    None when no frame is claimed (the caller goes on with its own path). `standard` is
    `decoder.mbus.decode` itself: the unclaimed frames go through it unchanged.
    """
    if not _WMBUS:
        return None
    claimed: dict[tuple[int, int], list[int]] = {}
    by_id: dict[int, Driver] = {}
    here = _SCOPE.get()
    for i, raw in enumerate(frames):  # per frame: one 3-byte key and one dict lookup
        frame = raw if isinstance(raw, bytes) else bytes(raw)
        driver = _claim(frame, here)
        if driver is not None:
            claimed.setdefault((id(driver), len(frame)), []).append(i)
            by_id[id(driver)] = driver
    if not claimed:
        return None
    n = len(frames)
    rx = np.asarray(received_at_s, np.int64)
    parts: list[tuple[Ints, Decoded]] = []
    taken = np.zeros(n, bool)
    for (which, _), rows in claimed.items():
        idx = np.asarray(rows, np.int64)
        taken[idx] = True
        driver = by_id[which]
        a = k.stack([bytes(frames[i]) for i in rows])
        ids = np.array([_address_of(driver, bytes(frames[i])) for i in rows], object)
        off = utc_offset_s if isinstance(utc_offset_s, int) else utc_offset_s[idx]
        parts.append((idx, decode_rows(driver, a, rx[idx], ids, keys, off)))
    rest = np.flatnonzero(~taken)
    if rest.size:
        off = utc_offset_s if isinstance(utc_offset_s, int) else utc_offset_s[rest]
        decode = standard  # the standard path: it calls route_mbus again, which claims none
        got = decode([frames[i] for i in rest.tolist()], rx[rest], keys, cache,
                     utc_offset_s=off)  # fmt: skip
        parts.append((rest, got))
    return concat(parts, n)


# --- raw NB-IoT vendor payloads: the top-level format `driver` ------------------------


def _raw_match(driver: Driver, a: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Rows of an (N, L) group that carry the driver's magic at its offset and length."""
    m = driver.match
    n, width = a.shape
    if not m.min_length <= width <= m.max_length or m.magic_at + len(m.magic) > width:
        return np.zeros(n, bool)
    want = np.frombuffer(m.magic, np.uint8)
    hit: npt.NDArray[np.bool_] = np.all(a[:, m.magic_at : m.magic_at + len(want)] == want, axis=1)
    return hit


def detect_raw_array(a: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Rows any raw driver of this scope claims."""
    hit = np.zeros(len(a), bool)
    for d in _visible(_RAW):
        hit |= _raw_match(d, a)
    return hit


def detect_raw(frame: bytes) -> bool:
    """Whether any raw driver of this scope claims `frame`."""
    return bool(_RAW) and bool(detect_raw_array(np.frombuffer(frame, np.uint8)[None, :])[0])


def decode_raw_array(
    a: npt.NDArray[np.uint8],
    received_at_s: Ints,
    keys: Mapping[str, bytes] | None = None,
    cache: object | None = None,
    *,
    variant: str | None = None,
) -> Decoded:
    """(N, L) raw frames -> Decoded, each row through the first driver claiming it
    (only the driver named `variant` when a hint `driver:<name>` gave one)."""
    del cache
    n = len(a)
    rx = k.as_received(received_at_s, n)
    parts: list[tuple[Ints, Decoded]] = []
    free = np.ones(n, bool)
    chosen = _visible(_RAW)
    if variant is not None:
        chosen = [d for d in chosen if d.name == variant][:1]
        if not chosen:
            return _refused(n, "driver", ErrorCode.UNSUPPORTED,
                            f"no raw driver named {variant!r} is installed")  # fmt: skip
    for d in chosen:
        hit = _raw_match(d, a) & free
        if not hit.any():
            continue
        free &= ~hit
        if hit.all():
            return decode_rows(d, a, rx, keys=keys)
        rows = np.flatnonzero(hit)
        parts.append((rows, decode_rows(d, a[rows], rx[rows], keys=keys)))
    if free.any():
        rows = np.flatnonzero(free)
        parts.append((rows, _refused(rows.size, "driver", ErrorCode.UNKNOWN_FORMAT,
                                     "no installed driver matches this frame")))  # fmt: skip
    return concat(parts, n)


def decode_raw(
    frames: Sequence[bytes],
    received_at_s: Ints,
    keys: Mapping[str, bytes] | None = None,
    cache: object | None = None,
    *,
    variant: str | None = None,
) -> Decoded:
    """Raw vendor frames (any lengths) -> Decoded, grouped by length."""
    n = len(frames)
    rx = k.as_received(received_at_s, n)
    parts = []
    for idx, a in k.group_by_length(frames, k.lengths_of(frames)):
        parts.append((idx, decode_raw_array(a, rx[idx], keys, cache, variant=variant)))
    return concat(parts, n)


def _install_builtin() -> None:
    """Install the shipped driver files (validated and golden-checked like any other)."""
    folder = resources.files(__name__).joinpath("builtin")
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            install(load(entry.read_text(encoding="utf-8"), f"builtin/{entry.name}"))


_install_builtin()

# raw vendor payloads: tried before every other format (a driver's magic of 2 or more bytes
# at a fixed offset, and its length range, are a stronger signature than any detector's)
FORMAT = register(
    Format(
        key="driver",
        detect=detect_raw,
        detect_array=detect_raw_array,
        decode=decode_raw,
        decode_array=decode_raw_array,
        takes_variant=True,  # hint "driver:<name>" picks one driver
    )
)
