"""Benchmark (not a test): M-Bus/OMS decoder frames/s on a 100,000-frame mixed batch.

The batch mixes real frames (libmbus wired RSP_UD frames, wmbusmeters standard-record
wireless telegrams, repeated) with encoder-built variants (wired, plain and AES mode 5
wireless frames of varying ids, registers and clocks). pyMeterBus (`meterbus`, a dev
dependency) decodes the same WIRED frames in the same run as the peer figure.

Then wireless throughput with vendor codecs in the mix, as many frames each: the batch's
standard wireless frames (EN 13757-3 records, plain and AES), driver-decoded vendor
frames (Diehl IZAR frames of varying ids and totals scrambled here with the published
PRIOS default key, and the golden frames of every shipped wM-Bus driver file: Apator,
Techem, Qundis, Zenner, BMT), and the two interleaved half and half. Run:

    .venv/bin/python bench/decode_mbus.py [n_frames]
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from decoder import drivers, mbus
from decoder.vendors import prios

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"
KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
IZAR_KEY = bytes.fromhex(prios.DEFAULT_KEYS[0])


def real_frames() -> tuple[list[bytes], list[bytes]]:
    """(wired, wireless) real frames that decode without keys, or ([], []) if absent."""
    if not VECTORS.is_dir():
        return [], []
    probe: list[bytes] = []
    for name in ("mbus_libmbus.jsonl", "wmbus_wmbusmeters.jsonl"):
        with (VECTORS / name).open() as fh:
            probe += [bytes.fromhex(json.loads(line)["hex"]) for line in fh if line.strip()]
    # one frame per batch, so compact frames (which need a learned format) drop out
    ok = [f for f in probe if mbus.decode([f], np.zeros(1, np.int64)).error_code[0] == 0]
    # wired: variable-data frames only (CI 72), which pyMeterBus also decodes
    return [f for f in ok if f[0] == 0x68 and f[6] == 0x72], [f for f in ok if f[0] != 0x68]


def build(n: int, rng: random.Random) -> tuple[list[bytes], dict[str, bytes]]:
    """`n` frames: 30% real wired, 20% encoded wired, 15% real wireless, 35% encoded OMS."""
    wired, wireless = real_frames()
    keys: dict[str, bytes] = {}
    frames: list[bytes] = []
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    models = [("KAM", 0x1B, 0x16), ("DME", 0x30, 0x07), ("EFE", 0x00, 0x07), ("ITW", 0x14, 0x03)]
    for i in range(n):
        kind = i % 20
        mid = f"{rng.randrange(10**8):08d}"
        man, ver, dev = models[i % len(models)]
        total = rng.randrange(10**9) * 1000
        when = t0 + timedelta(seconds=rng.randrange(10**7))
        if kind < 6 and wired:
            frames.append(wired[i % len(wired)])
        elif kind < 10:
            frames.append(mbus.encode_wired(mid, man, ver, dev, i & 0xFF, total, when))
        elif kind < 13 and wireless:
            frames.append(wireless[i % len(wireless)])
        elif kind < 17:
            keys[mid] = KEY
            frames.append(mbus.encode_oms_mode5(mid, man, ver, dev, i & 0xFF, total, KEY, when))
        else:
            frames.append(mbus.encode_oms_plain(mid, man, ver, dev, i & 0xFF, total, when))
    return frames, keys


def izar_frame(i: int, total_l: int, last_l: int) -> bytes:
    """A Diehl IZAR (PRIOS, CI A2) frame scrambled with the first published default key,
    built here as the decoder's inverse: meter id 10,000,000 + i, totals in litres."""
    head = bytes.fromhex("44304C") + (10_000_000 + i).to_bytes(4, "little") + b"\xd4\x01\xa2"
    head += bytes.fromhex("011D0013")
    plain = b"\x4b" + total_l.to_bytes(4, "little") + last_l.to_bytes(4, "little") + b"\x5e\x39"
    frame = bytes([len(head) + len(plain)]) + head
    # PRIOS seed: frame bytes 2..13 as three big-endian words, XOR the 32-bit key
    seed = 0
    for at in (2, 6, 10):
        seed ^= int.from_bytes(frame[at : at + 4], "big")
    seed ^= prios.key32(IZAR_KEY)
    stream = prios.keystream(np.array([seed], np.uint32), len(plain))[0]
    return frame + bytes(p ^ int(k) for p, k in zip(plain, stream, strict=True))


def vendor_frames(n: int, rng: random.Random) -> list[bytes]:
    """`n` driver-decoded wireless frames: half IZAR frames of varying ids and totals
    (`izar_frame`), half the golden frames of every shipped wM-Bus driver file, repeated."""
    golden = [
        bytes.fromhex(e.hex)
        for d in drivers.installed()
        if d.match.transport == "wmbus"
        for e in d.examples
        if e.reject is None and e.key is None
    ]
    izar = []
    for i in range(min(n, 20_000)):
        total = rng.randrange(10**5, 10**9)
        izar.append(izar_frame(i, total, total - rng.randrange(10**5)))
    return [izar[i // 2 % len(izar)] if i % 2 else golden[i // 2 % len(golden)] for i in range(n)]


def bench_ours(frames: list[bytes], keys: dict[str, bytes]) -> tuple[float, int]:
    """Seconds to decode `frames` in one batch, and the number of readings."""
    received = np.full(len(frames), 1_700_000_000, np.int64)
    start = time.perf_counter()
    res = mbus.decode(frames, received, keys, mbus.SignatureCache())
    elapsed = time.perf_counter() - start
    assert int(np.count_nonzero(res.error_code)) == 0, "bench batch must decode cleanly"
    return elapsed, res.n_readings


def bench_pymeterbus(frames: list[bytes]) -> float:
    """Seconds for pyMeterBus to parse `frames` and evaluate every record value."""
    import meterbus  # peer library, only needed here

    start = time.perf_counter()
    for frame in frames:
        telegram = meterbus.load(data=frame)
        _ = [r.parsed_value for r in telegram.records]
    return time.perf_counter() - start


def main() -> None:
    """Build the batch, time both decoders, print frames/s and the ratio."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    frames, keys = build(n, random.Random(42))
    wired = [f for f in frames if f[0] == 0x68]
    ours_s, readings = bench_ours(frames, keys)
    ours_wired_s, _ = bench_ours(wired, {})
    peer_s = bench_pymeterbus(wired)
    print(f"cpus={os.cpu_count()} loadavg={', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"batch: {len(frames)} frames ({len(wired)} wired, {len(frames) - len(wired)} wireless,"
          f" {len(keys)} AES mode 5 meters), {readings} readings")  # fmt: skip
    print(f"nbmeter decoder, whole batch : {len(frames) / ours_s:12,.0f} frames/s ({ours_s:.2f} s)")
    print(f"nbmeter decoder, wired only  : {len(wired) / ours_wired_s:12,.0f} frames/s")
    print(f"pyMeterBus 0.8.5, wired only : {len(wired) / peer_s:12,.0f} frames/s ({peer_s:.2f} s)")
    print(f"ratio on wired frames        : {peer_s / ours_wired_s:12.1f} x")
    standard = [f for f in frames if f[0] != 0x68]
    vendor = vendor_frames(len(standard), random.Random(7))
    mixed = [f for pair in zip(standard, vendor, strict=True) for f in pair][: len(standard)]
    print(f"wireless, {len(standard)} frames each (vendor: IZAR built here + shipped drivers'"
          " golden frames):")  # fmt: skip
    std_s = 0.0
    for name, batch in (
        ("standard OMS", standard),
        ("vendor drivers", vendor),
        ("50/50 mix", mixed),
    ):
        took, _ = bench_ours(batch, keys)
        std_s = std_s or took
        print(f"  {name:<27}: {len(batch) / took:12,.0f} frames/s  ({std_s / took:.2f} x standard)")


if __name__ == "__main__":
    main()
