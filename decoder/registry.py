"""The format registry: key -> (detect, batch decode). Registering a key twice raises.

Like asyncpg's codec map, a duplicate key is a programming error found at import time,
never a silent overwrite. Formats are tried for detection in registration order, so the
formats with the strongest signatures (start bytes + structure, magic + CRC) register
first and the permissive ones (wireless M-Bus `L == len - 1`) last.

A format's `decode` has the M-Bus helper's signature
`decode(frames, received_at_s, keys, cache) -> Decoded`; formats that have per-model
variants (CJ/T 188 models, Qalcosonic layouts) also take `variant=` as a keyword, chosen
by a hint `"key:variant"` (e.g. `"cjt188:mfunhcu"`, `"interval:w1t"`); formats that read
a meter clock in local time take `utc_offset_s=` (int or one per frame). A fixed-layout
format may add `decode_array(a, received_at_s, keys, cache, **same keywords)` taking the
`(N, L)` array `decode_batch` already stacked for detection, so no frame is copied twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from decoder.columns import Decoded

Detect = Callable[[bytes], bool]
DetectArray = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.bool_]]
Decode = Callable[..., Decoded]
DecodeArray = Callable[..., Decoded]


class DuplicateFormatError(ValueError):
    """A second format tried to register a key that is already taken."""


@dataclass(frozen=True)
class Format:
    """One registered format: its key, detectors and batch decoder.

    `detect(frame)` is the per-frame classifier; `detect_array(a)` (optional) classifies an
    `(N, L)` array of equal-length frames at once and must agree with `detect`.
    `decode_array(a, ...)` (optional) decodes an `(N, L)` array of frames it detected.
    `variants` names the hint suffixes `decode(..., variant=...)` accepts;
    `takes_utc_offset`: the decoders accept `utc_offset_s=` for the meter clock.
    """

    key: str
    detect: Detect
    decode: Decode
    detect_array: DetectArray | None = None
    decode_array: DecodeArray | None = None
    variants: frozenset[str] = frozenset()
    takes_variant: bool = False
    takes_utc_offset: bool = False


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add `fmt` to the registry (detection order = registration order); raises on a dup."""
    if fmt.key in _FORMATS:
        msg = f"format key {fmt.key!r} is already registered; keys must be unique"
        raise DuplicateFormatError(msg)
    if ":" in fmt.key:
        msg = f"format key {fmt.key!r} must not contain ':' (it separates the variant)"
        raise ValueError(msg)
    _FORMATS[fmt.key] = fmt
    return fmt


def formats() -> Sequence[Format]:
    """Registered formats in detection order."""
    return tuple(_FORMATS.values())


def lookup(key: str) -> Format | None:
    """The format registered under `key`, or None."""
    return _FORMATS.get(key)


def parse_hint(hint: str) -> tuple[str, str | None]:
    """`"cjt188:mfunhcu"` -> ("cjt188", "mfunhcu"); `"senml"` -> ("senml", None)."""
    key, _, variant = hint.partition(":")
    return key.strip(), (variant.strip() or None)
