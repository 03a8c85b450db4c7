"""Bounded parsing of untrusted JSON and CBOR: size, nesting depth and tags checked first.

A payload is attacker-controlled bytes. `json.loads` recurses once per nesting level and
raises RecursionError near the interpreter's limit (`b'{"a":' + b'[' * 1000` is 1 KB),
and cbor2 builds whatever its semantic tags describe (shared references make a
structure that contains itself, tag 35 compiles a regular expression). Every JSON or CBOR
document a decoder reads goes through `load_json` / `load_cbor`:

- size: at most `MAX_DOCUMENT_BYTES` (the broker's largest packet, 64 KiB);
- depth: at most `MAX_DEPTH` nested arrays/objects. JSON is pre-scanned on the bytes
  (numpy, no per-byte Python): brackets inside strings do not count. CBOR uses cbor2's
  own `max_depth`, which refuses before descending;
- CBOR tags: only numbers (RFC 8949 §3.4.3 bignums 2/3, §3.4.4 decimal fraction 4 and
  bigfloat 5) and the self-describe tag 55799; any other tag is refused.

A number parsed exactly can still be absurd (JSON `1E+999999` is a Decimal): `int()` of
one takes seconds of CPU, so a decoder turns a Decimal into an int only below `INT8_END`.

Each refusal raises `LimitError` (a ValueError) saying which limit was passed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import cbor2
import numpy as np

INT8_END = Decimal(2**63)  # a device's number becomes an int only below this magnitude
MAX_DOCUMENT_BYTES = 65_536  # Mosquitto's max_packet_size in the stack's broker
# SenML packs are 2 deep (array of maps), 3 with a decimal fraction; platform JSON
# envelopes (OceanConnect `services[0].data`) about 5: 32 leaves room, far from recursion
MAX_DEPTH = 32

_BACKSLASH, _QUOTE = ord("\\"), ord('"')
_STEP = np.zeros(256, np.int8)  # JSON: +1 opens a level, -1 closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_NOT_SKELETON = bytes(sorted(set(range(256)) - set(b'[]{}"\\')))  # bytes translate drops
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_PASSES_UP_TO = 2048  # brackets; past this many, one numpy scan beats 33 replace passes
_CHUNK = 1 << 20  # bytes per numpy scan step: 8 MB of int64 levels at most
_ALLOWED_TAGS = frozenset({2, 3, 4, 5, 55799})
# cbor2's built-in semantic tags that are not numbers (cbor2 6.3 decoder table)
_REFUSED_TAGS = (0, 1, 25, 28, 29, 30, 35, 36, 37, 52, 54, 256, 258, 260, 261)


class LimitError(ValueError):
    """A document passes a parsing limit (size, depth or a CBOR tag); says which."""


def _check_size(doc: bytes) -> None:
    if len(doc) > MAX_DOCUMENT_BYTES:
        msg = f"document of {len(doc)} bytes is over the {MAX_DOCUMENT_BYTES}-byte limit"
        raise LimitError(msg)


@dataclass(frozen=True)
class Nesting:
    """How deep a JSON text nests: `depth` its deepest level (see `json_nesting`), and
    `past_at` the byte offset of the first bracket that opens a level past the limit, or
    None when no level is past it."""

    depth: int
    past_at: int | None


def json_nesting(doc: bytes, limit: int = MAX_DEPTH) -> Nesting:
    """How deep `doc` nests arrays/objects (brackets inside strings ignored), checked
    against `limit` levels. The one depth rule of uplinks (`load_json`) and API bodies.

    `depth` is exact on JSON once past the cheap bound (at most `limit` brackets: their
    count is returned), an upper bound for malformed input (an unterminated string),
    never an underestimate of what `json.loads` would descend into; past `limit` it is
    exact as well, and `past_at` says where. C-speed passes over the document's skeleton
    (its brackets and quotes) for the common case; otherwise one numpy scan in chunks of
    `_CHUNK` bytes (a 16 MiB body of `[` costs 8 MB, not one int64 per byte at once),
    carrying the escape parity, the in-string parity and the level across chunk ends.
    """
    opened = doc.count(b"[") + doc.count(b"{")
    if opened <= limit:
        return Nesting(opened, None)  # cheap bound: most documents never need a scan
    if b"\\" not in doc:  # no escapes: a string is quote to quote (an unterminated one
        # runs to the end: json.loads stops there, so its brackets are never nesting)
        outside = b"".join(doc.translate(None, _NOT_SKELETON).split(b'"')[::2])
        brackets = outside.translate(None, _NOT_BRACKET)
        if len(brackets) <= _PASSES_UP_TO:
            depth = _paired_depth(brackets, limit)
            if depth <= limit:
                return Nesting(depth, None)
    return _scan(doc, limit)


def json_depth(doc: bytes) -> int:
    """Deepest nesting of arrays/objects in `doc`: `json_nesting(doc).depth`."""
    return json_nesting(doc).depth


def _scan(doc: bytes, limit: int) -> Nesting:
    """`json_nesting` by one numpy pass over `doc`, chunk by chunk (see there)."""
    depth = deepest = 0
    inside = 0  # 1 while in a string at the end of the previous chunk
    slashes = 0  # backslashes that ended the previous chunk
    past_at: int | None = None
    for at in range(0, len(doc), _CHUNK):
        a = np.frombuffer(doc, np.uint8, min(_CHUNK, len(doc) - at), at)
        slash = a == _BACKSLASH
        # the length of the backslash run ending at each byte (0 off a run), the run the
        # previous chunk ended in continuing into this one
        run = np.cumsum(slash, dtype=np.int64)
        run -= np.maximum.accumulate(np.where(slash, 0, run))
        lead = int(np.argmin(slash)) if not slash.all() else len(a)
        run[:lead] += slashes
        # a quote is escaped when an odd run of backslashes precedes it (RFC 8259 §7); an
        # escape's letter (`\n`, `\u0041`) ends the run, so it never escapes a quote
        quote = a == _QUOTE
        quote[0] &= (slashes & 1) == 0
        quote[1:] &= (run[:-1] & 1) == 0
        # inside a string: after an odd number of unescaped quotes (the quote itself
        # counts as outside on one end, which is fine: it is not a bracket)
        in_string = ((np.cumsum(quote, dtype=np.int64) + inside) & 1).astype(bool)
        step = np.where(in_string, 0, _STEP[a])
        levels = depth + np.cumsum(step, dtype=np.int64)
        if past_at is None:
            past = np.flatnonzero(levels > limit)
            if past.size:
                past_at = at + int(past[0])
        deepest = max(deepest, int(levels.max()))
        depth, inside, slashes = int(levels[-1]), int(in_string[-1]), int(run[-1])
    return Nesting(deepest, past_at)


def _paired_depth(brackets: bytes, limit: int) -> int:
    """Deepest level the brackets reach, stopping once past `limit` (then an upper bound).

    Each pass removes every innermost pair (`[]`, `{}`) present at its start, i.e. one
    level of every nesting: the number of passes is the depth of what is well formed,
    and every opener left unmatched may add one more level. Three C-speed replaces per
    level, so a SenML pack (`[{}{}...]`) costs two passes.
    """
    rest = brackets
    passes = 0
    while passes <= limit:
        # "\x00" keeps a pair removed in this pass from completing another one
        shorter = rest.replace(b"[]", b"\x00").replace(b"{}", b"\x00").replace(b"\x00", b"")
        if len(shorter) == len(rest):
            break
        rest, passes = shorter, passes + 1
    return passes + rest.count(b"[") + rest.count(b"{")


def load_json(doc: bytes, **kwargs: Any) -> Any:
    """`json.loads(doc, **kwargs)` within the size and depth limits; LimitError else.

    `doc` must be UTF-8 (RFC 8259 §8.1; no guessing of UTF-16/32 from NUL bytes). Other
    malformed input raises what decoding and `json.loads` raise (ValueError subclasses).
    """
    _check_size(doc)
    depth = json_nesting(doc).depth
    if depth > MAX_DEPTH:
        msg = f"JSON nested {depth} levels deep; at most {MAX_DEPTH} are read"
        raise LimitError(msg)
    text = doc.decode("utf-8")
    try:
        return _decoder(**kwargs).decode(text)  # what json.loads(text, **kwargs) does
    except RecursionError as exc:  # cannot happen within MAX_DEPTH; never escape anyway
        msg = f"JSON nesting exhausted the parser: {exc}"
        raise LimitError(msg) from exc


@functools.lru_cache(maxsize=16)
def _decoder(**kwargs: Any) -> json.JSONDecoder:
    """One `json.JSONDecoder` per set of options (json.loads builds one per call when
    given any: 2-3 µs of a SenML pack's 15)."""
    return json.JSONDecoder(**kwargs)


def _refused(tag: int) -> LimitError:
    return LimitError(f"CBOR tag {tag} is not read (only number tags {sorted(_ALLOWED_TAGS)})")


def _refuse(tag: int) -> Callable[..., object]:
    def refuse(*_: object) -> object:  # cbor2 6.3 passes (value, immutable)
        raise _refused(tag)

    return refuse


def _unknown_tag(tag: cbor2.CBORTag, *_: object) -> object:
    raise _refused(tag.tag)


_SEMANTIC = {tag: _refuse(tag) for tag in _REFUSED_TAGS}


def load_cbor(doc: bytes) -> Any:
    """`cbor2.loads(doc)` within the size, depth and tag limits; LimitError else.

    Other malformed input raises cbor2's errors (`cbor2.CBORError`).
    """
    _check_size(doc)
    try:
        return cbor2.loads(
            doc, max_depth=MAX_DEPTH, semantic_decoders=_SEMANTIC, tag_hook=_unknown_tag
        )
    except cbor2.CBORDecodeError as exc:
        if isinstance(exc.__cause__, LimitError):  # cbor2 wraps what a tag decoder raises
            raise exc.__cause__ from None
        if "nesting depth" in str(exc):  # cbor2's max_depth refusal
            msg = f"CBOR nested over {MAX_DEPTH} levels deep ({exc})"
            raise LimitError(msg) from exc
        raise
    except RecursionError as exc:  # cannot happen within MAX_DEPTH; never escape anyway
        msg = f"CBOR nesting exhausted the parser: {exc}"
        raise LimitError(msg) from exc
