"""Array parameters as PostgreSQL array literals, for the collector's per-batch statements.

asyncpg encodes a list parameter element by element, and asks of each element whether it
is itself an array (`isinstance` against three `collections.abc` classes): 0.5 µs per
bigint and 0.9 µs per bytea or text element of the collector's CPU on a small machine,
more than the statement costs it otherwise. A literal is one `str` for asyncpg and one
`array_in` for PostgreSQL: the statement casts it, `$1::text::bigint[]`.

- `bigints`: `{1,2,3}` (Python ints; anything else is a TypeError, never a silent cast);
- `byteas`: `{"\\x0a0b",...}` (hex, so no byte needs escaping);
- `texts`: `{"a","b \\"quoted\\"",NULL}`: every element double-quoted, its backslashes
  and double quotes escaped (PostgreSQL's array literal rules), None as NULL.

`tests/storage/test_pgarrays.py` holds each literal equal, on the real server, to the
list asyncpg would have sent.
"""

from __future__ import annotations

from collections.abc import Iterable

_NULL = "NULL"


def bigints(values: Iterable[int]) -> str:
    """`values` as a bigint[] literal (cast it: `$n::text::bigint[]`)."""
    return "{" + ",".join(map(int.__repr__, values)) + "}"


def byteas(values: Iterable[bytes]) -> str:
    """`values` as a bytea[] literal (cast it: `$n::text::bytea[]`)."""
    return "{" + ",".join(['"\\\\x' + v.hex() + '"' for v in values]) + "}"


def _quoted(value: str | None) -> str:
    if value is None:
        return _NULL
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def texts(values: Iterable[str | None]) -> str:
    """`values` as a text[] literal (cast it: `$n::text::text[]`); each distinct value is
    quoted once (a batch's outcomes repeat: "stored", "")."""
    seen: dict[str | None, str] = {}
    out = []
    for v in values:
        q = seen.get(v)
        if q is None:
            q = seen[v] = _quoted(v)
        out.append(q)
    return "{" + ",".join(out) + "}"
