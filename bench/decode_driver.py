"""Benchmark (a script, not a test): a driver file's kernel vs the built-in CJ/T 188 kernel.

    .venv/bin/python bench/decode_driver.py [--frames 1000000] [--rounds 3]

Decodes a batch of `--frames` ACME NB-1 frames (the made-up vendor payload of
`decoder/drivers/builtin/acme_nb1.toml`: magic, BCD address, totals, clock, status,
battery, RSRP, CRC-16/MODBUS) and a batch of as many CJ/T 188 901F replies, side by side
in the same run, two ways each:
  kernel      the format's kernel on a prepared (N, L) uint8 array (driver: `decode_rows`,
              CJ/T 188: `cjt188.decode_array`), readings and columns included;
  end-to-end  `decoder.decode_batch(list[bytes])`: lengths, stacking, detection, kernel.
and prints frames/s and the driver/CJ/T 188 ratio of each (the issue's goal: >= 0.5).
Then wireless M-Bus throughput (`decoder.mbus.decode`, `--wmbus` frames) of standard
OMS frames alone, of vendor frames alone (the golden frames of the shipped wM-Bus driver
files: IZAR, Apator, Techem, Qundis, Zenner, BMT) and of a half-and-half mix.
Wall-clock, best of `--rounds` interleaved rounds; the machine is shared, so quote the
range of 2-3 runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import make_frames
from decoder import cjt188, decode_batch, drivers, mbus
from decoder import kernels as k
from decoder.drivers.kernel import decode_rows
from decoder.mbus_encode import encode_oms_plain

RX = 1_800_000_000


def crc_modbus(data: bytes) -> int:
    """CRC-16/MODBUS of one frame (the encoder side; the driver checks it vectorized)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def acme_frames(n: int, distinct: int = 20_000) -> list[bytes]:
    """`n` ACME NB-1 frames cycling `distinct` random ones (as `make_frames` does)."""
    rng = np.random.default_rng(7)
    base = []
    for _ in range(distinct):
        body = (
            bytes.fromhex("AC4E01")
            + bytes.fromhex(f"{int(rng.integers(10**12)):012d}")
            + int(rng.integers(2**31)).to_bytes(4, "little")
            + int(rng.integers(2**31)).to_bytes(4, "little")
            + (RX - int(rng.integers(86_400))).to_bytes(4, "little")
            + int(rng.integers(64)).to_bytes(2, "little")
            + int(rng.integers(3000, 3700)).to_bytes(2, "little")
            + int(rng.integers(0, 256)).to_bytes(1, "little")
        )
        base.append(body + crc_modbus(body).to_bytes(2, "little"))
    return [base[i % distinct] for i in range(n)]


def wmbus_frames(n: int) -> tuple[list[bytes], list[bytes]]:
    """`n` standard OMS frames (varying ids and registers) and `n` vendor frames."""
    standard = [
        encode_oms_plain(f"{i % 50_000:08d}", "NBM", 1, 0x07, i & 0xFF, 1000 * i)
        for i in range(min(n, 50_000))
    ]
    vendor = [
        bytes.fromhex(e.hex)
        for d in drivers.installed()
        if d.match.transport == "wmbus"
        for e in d.examples
        if e.reject is None and e.key is None
    ]
    return [standard[i % len(standard)] for i in range(n)], [
        vendor[i % len(vendor)] for i in range(n)
    ]


def best_of(fns: Sequence[Callable[[], object]], rounds: int) -> list[float]:
    """Best wall-clock seconds of each of `fns` over interleaved rounds."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for j, fn in enumerate(fns):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def main(argv: Sequence[str] | None = None) -> None:
    """Measure both formats in one run and print rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wmbus", type=int, default=100_000)
    args = parser.parse_args(argv)
    n = args.frames
    driver = next(d for d in drivers.installed() if d.name == "acme_nb1")
    acme, cjt = acme_frames(n), make_frames(n)
    a_acme, a_cjt = k.stack(acme), k.stack(cjt)
    rx = np.full(n, RX, np.int64)
    check = decode_batch(acme[:1000], RX)
    assert (check.error_code == 0).all(), check.error_message[check.error_code != 0][:3]
    assert (decode_batch(cjt[:1000], RX).error_code == 0).all()
    t_dk, t_ck, t_de, t_ce = best_of(
        [
            lambda: decode_rows(driver, a_acme, rx),
            lambda: cjt188.decode_array(a_cjt, rx),
            lambda: decode_batch(acme, RX),
            lambda: decode_batch(cjt, RX),
        ],
        args.rounds,
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"frames={n}  driver=acme_nb1 ({len(acme[0])} B, CRC-16)  cjt188=901F ({len(cjt[0])} B)")
    print(f"cpus={os.cpu_count()} loadavg={load}; best of {args.rounds} interleaved rounds")
    rows = (("kernel", t_dk, t_ck), ("end-to-end", t_de, t_ce))
    for name, t_driver, t_cjt in rows:
        print(
            f"{name:<11} driver {n / t_driver / 1e6:6.3f} M frames/s   "
            f"cjt188 {n / t_cjt / 1e6:6.3f} M frames/s   ratio={t_cjt / t_driver:.2f}"
        )
    m = args.wmbus
    standard, vendor = wmbus_frames(m)
    mixed = [f for pair in zip(standard[: m // 2], vendor[: m // 2], strict=True) for f in pair]
    rx_m = np.full(m, RX, np.int64)
    assert (mbus.decode(vendor[:500], rx_m[:500]).error_code == 0).all()
    times = best_of([lambda b=b: mbus.decode(b, rx_m[: len(b)]) for b in (standard, vendor, mixed)],
                    args.rounds)  # fmt: skip
    for name, t in zip(("standard OMS", "vendor drivers", "50/50 mix"), times, strict=True):
        print(f"wmbus {name:<15} {m / t / 1e3:8.1f} k frames/s  (mbus.decode, {m} frames)")


if __name__ == "__main__":
    main()
