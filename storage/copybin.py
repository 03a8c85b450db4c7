"""PostgreSQL binary COPY streams built from and parsed into numpy columns, no row loop.

`encode_chunks(columns, n_rows)` yields a `COPY ... FROM STDIN (FORMAT binary)` payload
for equal-length fixed-width columns, a chunk of rows at a time; `decode_int8(payload,
n_fields)` parses a `COPY ... TO STDOUT (FORMAT binary)` result whose fields are all
non-null 8-byte integers (bigint, timestamptz).

The stream (PostgreSQL docs, "COPY", Binary Format): an 11-byte signature, an int32
flags word and an int32 header-extension length; then per tuple an int16 field count
and, per field, an int32 byte length followed by the value in network byte order
(big-endian); then an int16 -1 trailer. Every field here is fixed-width and non-null,
so a tuple is a fixed-size record: one structured numpy array with big-endian fields
holds a chunk of tuples, and numpy byte-swaps a whole column per assignment. asyncpg's
`copy_records_to_table` encodes each row in Python and is several times slower.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # flags 0, no extension
TRAILER = b"\xff\xff"  # int16 -1

# PostgreSQL timestamptz is int64 microseconds since 2000-01-01 00:00:00 UTC
PG_EPOCH_S = 946_684_800
US_PER_S = 1_000_000

# the wire type of each supported PostgreSQL column type (all fixed-width)
WIRE: dict[str, str] = {
    "smallint": ">i2",
    "integer": ">i4",
    "bigint": ">i8",
    "timestamptz": ">i8",  # microseconds since PG_EPOCH_S
}

Column: TypeAlias = tuple[str, str, "npt.NDArray[np.generic] | int"]
"""(name, PostgreSQL type from WIRE, values: an array of the batch's length or a scalar)."""


def record_dtype(columns: Sequence[Column]) -> np.dtype[np.void]:
    """The packed numpy record of one tuple: field count, then (length, value) per column."""
    fields: list[tuple[str, str]] = [("_nfields", ">i2")]
    for name, pg_type, _ in columns:
        fields.append((f"_len_{name}", ">i4"))
        fields.append((name, WIRE[pg_type]))
    return np.dtype(fields)


def encode_chunks(
    columns: Sequence[Column],
    n_rows: int,
    *,
    take: npt.NDArray[np.intp] | None = None,
    chunk_rows: int = 65_536,
) -> Iterator[memoryview | bytes]:
    """Yield the binary COPY payload of `n_rows` tuples, `chunk_rows` tuples per chunk.

    With `take`, row i of the payload is row `take[i]` of every array column (so the
    caller need not gather first). Values are cast, wrapping, to the wire type: uint32
    flags with bit 31 set become a negative integer with the same bits. A yielded
    memoryview is only valid until the next chunk is requested (the buffer is reused;
    asyncpg copies each chunk into its own message). Raises KeyError for a type not in
    WIRE and ValueError for an array column of another length.
    """
    expected = n_rows if take is None else None
    for name, _, values in columns:
        if isinstance(values, np.ndarray) and expected is not None and len(values) != expected:
            msg = f"column {name} has {len(values)} rows, expected {expected}"
            raise ValueError(msg)
    if take is not None and len(take) != n_rows:
        msg = f"take has {len(take)} rows, expected {n_rows}"
        raise ValueError(msg)
    yield HEADER
    if n_rows:
        size = min(chunk_rows, n_rows)
        body = np.empty(size, dtype=record_dtype(columns))
        # constants once per buffer: the field count and every field's byte length
        body["_nfields"] = len(columns)
        for name, pg_type, values in columns:
            body[f"_len_{name}"] = np.dtype(WIRE[pg_type]).itemsize
            if not isinstance(values, np.ndarray):
                body[name] = values
        for start in range(0, n_rows, size):
            stop = min(start + size, n_rows)
            part = body[: stop - start]
            rows = slice(start, stop) if take is None else take[start:stop]
            for name, _, values in columns:
                if isinstance(values, np.ndarray):
                    part[name] = values[rows]
            yield part.view(np.uint8).data
    yield TRAILER


def encode(columns: Sequence[Column], n_rows: int) -> bytes:
    """The whole binary COPY payload of `n_rows` tuples as one bytes object (see encode_chunks)."""
    return b"".join(bytes(chunk) for chunk in encode_chunks(columns, n_rows))


def decode_int8(payload: bytes, n_fields: int) -> npt.NDArray[np.int64]:
    """Parse a binary COPY result of `n_fields` non-null 8-byte fields into an (N, n_fields) array.

    Raises ValueError if the payload is not such a stream.
    """
    if not payload.startswith(SIGNATURE) or not payload.endswith(TRAILER):
        msg = "not a PostgreSQL binary COPY stream"
        raise ValueError(msg)
    ext_len = int.from_bytes(payload[15:19], "big")
    start = 19 + ext_len
    fields: list[tuple[str, str]] = [("_nfields", ">i2")]
    for i in range(n_fields):
        fields += [(f"_len{i}", ">i4"), (f"f{i}", ">i8")]
    dtype = np.dtype(fields)
    body = payload[start : len(payload) - len(TRAILER)]
    if len(body) % dtype.itemsize:
        msg = f"COPY body of {len(body)} bytes is not a whole number of {n_fields}-field tuples"
        raise ValueError(msg)
    records = np.frombuffer(body, dtype=dtype)
    if records.size and (
        np.any(records["_nfields"] != n_fields)
        or any(np.any(records[f"_len{i}"] != 8) for i in range(n_fields))
    ):
        msg = f"COPY tuples are not {n_fields} non-null 8-byte fields"
        raise ValueError(msg)
    out = np.empty((records.size, n_fields), dtype=np.int64)
    for i in range(n_fields):
        out[:, i] = records[f"f{i}"]
    return out
