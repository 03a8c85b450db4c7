"""Local decode of a simulated frame, for `sim device` to print next to the hex."""

from __future__ import annotations

import numpy as np

from decoder import decode_batch
from simulator.fleet import Meter


def describe(fmt: object, payload: bytes, received_at_s: int, meter: Meter) -> list[str]:
    """One line per decoded reading (or the decoder's error), via `decoder.decode_batch`."""
    keys = {meter.address: meter.oms_key} if meter.oms_key else {}
    out = decode_batch([payload], np.array([received_at_s], np.int64), keys=keys)
    if out.error_code[0]:
        return [f"error {int(out.error_code[0])}: {out.error_message[0]}"]
    return [
        f"{out.address[j]} read_at={int(out.read_at_s[j])} register_ml={int(out.register_ml[j])}"
        f" flags={int(out.flags[j]):#x}"
        for j in range(out.n_readings)
    ]
