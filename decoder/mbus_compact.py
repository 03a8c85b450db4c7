"""EN 13757-3 compact frames: the format-signature cache learned from full frames.

A compact frame (CI 79 / 7B / 73) leaves out the DIF/VIF header and sends
`signature(2, LE) ‖ data CRC(2, LE) ‖ values`, where the signature is the EN 13757-4
CRC-16 over the header bytes of the matching full frame (wmbusmeters `hash_to_format_`).
`SignatureCache` remembers those header bytes per meter model; the decoder stays pure
because the caller owns the cache and can persist it with `to_dict()` / `from_dict()`.
`DeferredCache` is a view of one for a single decode call: what the call learns is kept
apart, with the meters that taught it, until the caller trusts those meters' frames
(the collector: once they are stored), so a refused frame teaches nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping

from decoder.columns import ErrorCode
from decoder.mbus_link import crc16_en13757
from decoder.mbus_records import Layout, Skeleton, compile_layout, walk_format
from decoder.vendors.compact_formats import known_format

Model = tuple[str, int, int]  # (manufacturer, version, device type)
Key = tuple[str, int, int, int]  # (manufacturer, version, device type, signature)


def not_learned(model: Model, signature: int) -> str:
    """The UNKNOWN_COMPACT message of a compact frame of `model` whose format `signature`
    no cache holds. Stable text: a caller finds the frames it refused by it once the
    format is learned (the collector re-decodes them)."""
    who = f"{model[0]} v{model[1]} type 0x{model[2]:02X}"
    return (
        f"compact frame signature {signature:04X} of {who} not learned yet; wait for a full frame"
    )


class SignatureCache:
    """(manufacturer, version, device type, signature) -> DIF/VIF format bytes; dict-like."""

    def __init__(self, entries: Mapping[Key, bytes] | None = None) -> None:
        """An empty cache, or one holding `entries`."""
        self._formats: dict[Key, bytes] = dict(entries or {})

    def learn(self, model: Model, format_bytes: bytes, meters: Iterable[str] = ()) -> int:
        """Remember the header of a full frame of `model` (sent by `meters`, which this
        cache does not keep); returns its format signature."""
        del meters
        sig = crc16_en13757(format_bytes)
        self._formats[(*model, sig)] = bytes(format_bytes)
        return sig

    def lookup(self, model: Model, signature: int) -> bytes | None:
        """The format bytes learned for `model` under `signature`, else a format the
        manufacturer's models are known to use (`decoder.vendors.compact_formats`), or None."""
        learned = self._formats.get((*model, signature))
        return learned if learned is not None else known_format(model[0], signature)

    def __len__(self) -> int:
        """Number of learned formats."""
        return len(self._formats)

    def __iter__(self) -> Iterator[Key]:
        """The learned (manufacturer, version, device type, signature) keys."""
        return iter(self._formats)

    def __contains__(self, key: object) -> bool:
        """Whether a (manufacturer, version, device type, signature) key was learned."""
        return key in self._formats

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form: "MAN/version/type/signature" (hex) -> format bytes (hex)."""
        return {
            f"{m}/{v:02x}/{t:02x}/{s:04x}": fmt.hex() for (m, v, t, s), fmt in self._formats.items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> SignatureCache:
        """Inverse of `to_dict`; raises ValueError on a malformed key or hex string."""
        entries: dict[Key, bytes] = {}
        for key, fmt in data.items():
            man, version, dev, sig = key.split("/")
            entries[(man, int(version, 16), int(dev, 16), int(sig, 16))] = bytes.fromhex(fmt)
        return cls(entries)


class DeferredCache(SignatureCache):
    """One decode call's view of `known`: lookups see `known` (and the vendor table) only;
    what the call learns is kept in `learned`, with the meters that taught it in
    `teachers`, and is used by none of the call's own frames.

    The caller adds a learned format to `known` once it trusts a meter that taught it, so
    a frame that is refused after decoding (an unknown meter, another device's frame)
    never teaches the format its neighbours in the batch are read with.
    """

    def __init__(self, known: SignatureCache | None = None) -> None:
        """A view of `known` (None: an empty cache: the vendor table only)."""
        super().__init__()
        self.known = known if known is not None else SignatureCache()
        self.teachers: dict[Key, set[str]] = {}

    def learn(self, model: Model, format_bytes: bytes, meters: Iterable[str] = ()) -> int:
        """Keep the header of a full frame of `model` apart, with the `meters` that sent it."""
        sig = super().learn(model, format_bytes)
        self.teachers.setdefault((*model, sig), set()).update(str(m) for m in meters)
        return sig

    def lookup(self, model: Model, signature: int) -> bytes | None:
        """The format `known` holds for `model` under `signature` (never one learned here)."""
        return self.known.lookup(model, signature)

    @property
    def learned(self) -> dict[Key, bytes]:
        """The formats learned during the call: key -> format bytes."""
        return dict(self._formats)


def split(app: bytes) -> tuple[int, int, bytes] | tuple[ErrorCode, str]:
    """A compact payload -> (signature, data CRC, values), or (code, message)."""
    if len(app) < 4:
        return ErrorCode.TRUNCATED, "compact frame shorter than signature + data CRC"
    sig = int.from_bytes(app[0:2], "little")
    return sig, int.from_bytes(app[2:4], "little"), app[4:]


@functools.lru_cache(maxsize=1024)
def compact_layout(format_bytes: bytes) -> tuple[Layout, Skeleton] | tuple[ErrorCode, str]:
    """The value-stream layout (and skeleton) of a learned format, cached per format."""
    skeleton = walk_format(format_bytes)
    if isinstance(skeleton, tuple):
        return skeleton
    return compile_layout(skeleton), skeleton


def data_crc_ok(skeleton: Skeleton, values: bytes, stored: int) -> bool:
    """EN 13757-3 compact frame: the data CRC covers the full records (headers + values).

    [checked] Kamstrup Multical 21 `EDA8 6AB6 …`: CRC-16/EN13757 over the re-interleaved
    records gives 0xB66A, over the values alone it does not.
    """
    full = b"".join(
        r.dib + r.vib + values[r.data_at : r.data_at + r.width] for r in skeleton.records
    )
    return crc16_en13757(full) == stored


def drop_fill(app: bytes, end: int) -> bytes:
    """`app` cut to `end` bytes when everything past `end` is 2F idle filler (EN 13757-3:
    an encrypted compact payload is filled up to whole AES blocks with 2F); else as is."""
    if len(app) > end and app[end:].count(0x2F) == len(app) - end:
        return app[:end]
    return app
