"""Benchmark (a script, not a test): vectorized CJ/T 188 decoding vs a per-frame Python loop.

    .venv/bin/python bench/decode.py [--frames 1000000] [--naive 100000]

Prints frames/s for
  kernel      the numpy kernel on a prepared (N, 35) uint8 array: locate the 0x68, CS,
              BCD totals, units -> mL, both clock byte orders, ST flags (columns only);
  end-to-end  `decoder.decode_batch(list[bytes])`: classification, stacking, the kernel,
              meter-id strings and the per-frame `extra` dicts (Decimal settlement...);
  naive       a straightforward per-frame Python decoder producing the same fields, run
              on a subset (`--naive`) and extrapolated as a rate (frames/s do not depend
              on N for a per-frame loop);
and `speedup=` kernel/naive and end-to-end/naive. Wall-clock, best of 3.
"""

from __future__ import annotations

import argparse
import calendar
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import numpy as np

from decoder import cjt188, decode_batch
from decoder import cjt188_kernel as kernel
from decoder import kernels as k
from decoder.encode_cjt188 import encode_cjt188

RX = 1_700_000_000


def make_frames(n: int, distinct: int = 20_000) -> list[bytes]:
    """`n` 901F replies (2 FE preamble, both DI orders, clocks) cycling `distinct` frames."""
    rng = np.random.default_rng(42)
    base = [
        encode_cjt188(
            address=f"{rng.integers(10**13):014d}",
            total_ml=int(rng.integers(10**8)) * 10_000,
            settlement_ml=int(rng.integers(10**8)) * 10_000,
            clock=datetime.fromtimestamp(RX - int(rng.integers(86400)), UTC),
            status=int(rng.integers(0, 8)),
            di_order=("be", "le")[i % 2],
            preamble=2,
        )
        for i in range(distinct)
    ]
    return [base[i % distinct] for i in range(n)]


def naive_decode(frame: bytes, received_at_s: int) -> dict[str, object] | None:
    """The per-frame reference: what one would write without numpy (same fields)."""
    s = frame.find(b"\x68")
    f = frame[s:]
    if len(f) < 35 or f[34] != 0x16 or sum(f[:33]) & 0xFF != f[33]:
        return None

    def bcd(b: bytes) -> int:
        return sum(((x >> 4) * 10 + (x & 15)) * 100**i for i, x in enumerate(b))

    unit = cjt188.VOLUME_UNITS[f[18]]
    ml = bcd(f[14:18]) * unit[1] * (10_000 if unit[0] == "m3" else 10)
    c = [(x >> 4) * 10 + (x & 15) for x in f[24:31]]
    try:
        local = calendar.timegm((c[6] * 100 + c[5], c[4], c[3], c[2], c[1], c[0]))
        read_at = local - cjt188.BEIJING_UTC_OFFSET_S
    except (ValueError, OverflowError):
        read_at = received_at_s
    st = f[31]
    return {
        "meter_id": f[2:9][::-1].hex().upper(),
        "register_ml": ml,
        "read_at_s": read_at,
        "valve": ("open", "closed", "abnormal", "abnormal")[st & 3],
        "low_battery": bool(st & 4),
        "settlement": bcd(f[19:23]),
    }


def kernel_columns(a: k.Frames, rx: k.Int64s) -> kernel.Columns:
    """The vectorized work on a prepared array: locate, CS check, then the 901F kernel."""
    start, found = kernel.locate(a, cjt188._T_OK)
    f = a[:, 2:37]  # every row has the same 2-byte preamble here (checked by `found`)
    assert found.all()
    assert (start == 2).all()
    cs_ok = k.sum8(f, 0, 33) == f[:, 33]
    cols = kernel.read_901f(f, rx, cjt188.MODELS["standard"])
    assert cs_ok.all()
    return cols


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall-clock seconds of `repeat` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the three measurements and print rates and speedups."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--naive", type=int, default=100_000)
    args = parser.parse_args(argv)
    frames = make_frames(args.frames)
    a = k.stack(frames)
    rx = np.full(len(frames), RX, np.int64)

    t_kernel = best_of(lambda: kernel_columns(a, rx))
    t_e2e = best_of(lambda: decode_batch(frames, RX), repeat=2)
    subset = frames[: args.naive]
    t_naive = best_of(lambda: [naive_decode(f, RX) for f in subset], repeat=2)

    check = decode_batch(frames[:1000], RX)
    naive = [naive_decode(f, RX) for f in frames[:1000]]
    assert check.register_ml.tolist() == [r["register_ml"] for r in naive if r]
    assert check.read_at_s.tolist() == [r["read_at_s"] for r in naive if r]

    kernel_rate = len(frames) / t_kernel
    e2e_rate = len(frames) / t_e2e
    naive_rate = len(subset) / t_naive
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"frames={len(frames)} frame_bytes={len(frames[0])} (CJ/T 188 901F, 2 FE preamble)")
    print(f"cpus={os.cpu_count()} loadavg={load} (a shared machine makes every figure lower)")
    print(f"kernel      {kernel_rate / 1e6:8.2f} M frames/s  (prepared (N, L) uint8 array)")
    print(f"end-to-end  {e2e_rate / 1e6:8.2f} M frames/s  (decode_batch(list[bytes]) -> Decoded)")
    print(f"naive       {naive_rate / 1e6:8.3f} M frames/s  (per-frame Python, measured on "
          f"{len(subset)} frames, rate extrapolated to {len(frames)})")  # fmt: skip
    print(f"speedup={kernel_rate / naive_rate:.1f}  (kernel vs naive)")
    print(f"speedup_end_to_end={e2e_rate / naive_rate:.1f}  (decode_batch vs naive)")
    # --- M-Bus / OMS: the M-Bus helper adds its figures in bench/decode_mbus.py (or here) ---


if __name__ == "__main__":
    main()
