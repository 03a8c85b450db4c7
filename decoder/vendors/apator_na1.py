"""Apator NA-1 (manufacturer APA, CI A0/A1): AES-128-CBC over 16 manufacturer bytes.

The payload after the CI is `ACC ‖ frame status ‖ 16 encrypted bytes`; they decrypt with
the meter's key and the OMS mode 5 IV (M ‖ A ‖ ACC × 8). The plaintext starts with the
0x2F idle filler, then the packed register, the meter clock (seconds since 2000), the
historic delta and the status bytes (see the driver file `apator_na1.toml`). A missing
key is NO_KEY; the driver checks the filler and the clock, so a wrong key is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from decoder import oms_crypto
from decoder.columns import ErrorCode
from decoder.mbus_link import key_for

ENCRYPTED_AT, ENCRYPTED = 2, 16  # payload offset and size of the AES block
Frames = npt.NDArray[np.uint8]


def decrypt(
    frames: Frames, addresses: npt.NDArray[np.object_], keys: Mapping[str, bytes]
) -> tuple[Frames, npt.NDArray[np.uint16], str]:
    """`(N, L)` NA-1 frames -> payload after the CI with its AES block decrypted."""
    payload = frames[:, 11:].copy()
    code = np.zeros(len(frames), np.uint16)
    if payload.shape[1] < ENCRYPTED_AT + ENCRYPTED:
        code[:] = ErrorCode.TRUNCATED
        return payload, code, "NA-1 payload shorter than its AES block"
    for i, mid in enumerate(addresses.tolist()):  # one AES call per frame (CBC, own IV)
        key = key_for(keys or {}, str(mid))
        if key is None or len(key) != oms_crypto.BLOCK:
            code[i] = ErrorCode.NO_KEY
            continue
        row = frames[i]
        iv = oms_crypto.mode5_iv(row[2:4].tobytes(), row[4:10].tobytes(), int(payload[i, 0]))
        block = payload[i, ENCRYPTED_AT : ENCRYPTED_AT + ENCRYPTED].tobytes()
        plain = oms_crypto.cbc_decrypt(key, iv, block)
        payload[i, ENCRYPTED_AT : ENCRYPTED_AT + ENCRYPTED] = np.frombuffer(plain, np.uint8)
    return payload, code, "no 16-byte AES key for this NA-1 meter"
