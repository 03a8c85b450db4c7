"""A historical read import's body (CSV or a JSON array) as rows to enter, checked row by row.

`parse(body, kind)` returns the rows that are well-formed as `storage.manual_reads`'s
EnteredRead and a (line, reason) for every other one; the caller refuses the whole import
when there is any. Pure: bytes in, rows out. Bounds: `MAX_ROWS` rows, JSON nesting is
never followed (an array of flat objects), CSV fields at most `_MAX_FIELD` characters.

CSV: UTF-8, a header row naming the columns (meter_id or address, read_at, register_m3 or
register_ml, optionally quality and note; any case), an empty cell is an absent value;
`line` is the row's line in the file (the header is line 1; LF, CRLF or CR end a line).
JSON: an array of objects with the same keys; `line` is the object's position in the
array (from 1). Numbers in JSON are kept exact (Decimal), never floats. The body is read
by `api.bodies`' strict CSV reader and bounded JSON loader; an unreadable body raises its
`BodyError` (which line, and why).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Literal

from pydantic import ValidationError

from api.bodies import BodyError, csv_rows, load_json
from api.schemas_manual import ImportRow
from storage.manual_reads import EnteredRead

__all__ = ["MAX_ROWS", "BodyError", "Kind", "Problem", "TooManyRowsError", "parse"]

Kind = Literal["csv", "json"]
MAX_ROWS = 100_000
_MAX_FIELD = 1024
_COLUMNS = frozenset(ImportRow.model_fields)
Problem = tuple[int, str]


class TooManyRowsError(BodyError):
    """The body holds more than MAX_ROWS rows."""


def parse(body: bytes, kind: Kind) -> tuple[list[EnteredRead], list[Problem]]:
    """The body's well-formed rows and the problems of the others; BodyError if unreadable."""
    raws = _csv_rows(body) if kind == "csv" else _json_rows(body)
    rows: list[EnteredRead] = []
    problems: list[Problem] = []
    for line, raw in raws:
        if len(rows) + len(problems) >= MAX_ROWS:
            msg = f"more than {MAX_ROWS:,} rows: split the import into several files"
            raise TooManyRowsError(line, msg)
        if isinstance(raw, str):
            problems.append((line, raw))
            continue
        try:
            row = ImportRow.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            problems.append((line, f"{where}: {first['msg']}" if where else first["msg"]))
            continue
        rows.append(
            EnteredRead(
                line=line,
                meter_id=row.meter_id,
                address=row.address,
                read_at=row.read_at,
                register_ml=row.millilitres(),
                quality=row.quality,
                note=row.note,
            )
        )
    if not rows and not problems:
        raise BodyError(1, "no rows: send a header and at least one row (CSV) or a JSON array")
    return rows, problems


def _csv_rows(body: bytes) -> Iterable[tuple[int, dict[str, str] | str]]:
    names, records = csv_rows(body, _COLUMNS, fold_case=True)
    for line, cells in records:
        if len(cells) != len(names):
            yield line, f"{len(cells)} cells, the header has {len(names)}"
        elif any(len(c) > _MAX_FIELD for c in cells):
            yield line, f"a cell is longer than {_MAX_FIELD} characters"
        else:
            yield line, {n: c.strip() for n, c in zip(names, cells, strict=True) if c.strip()}


def _no_constant(name: str) -> Any:
    msg = f"{name} is not a number"
    raise ValueError(msg)


def _json_rows(body: bytes) -> Iterable[tuple[int, dict[str, Any] | str]]:
    # a byte-order mark is tolerated as in a CSV (spreadsheet exports write one)
    body = body.removeprefix(codecs.BOM_UTF8)
    data = load_json(body, parse_float=Decimal, parse_constant=_no_constant)
    if not isinstance(data, list):
        raise BodyError(1, "the JSON body must be an array of objects, one per reading")
    out: list[tuple[int, dict[str, Any] | str]] = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            out.append((i, f"item {i} is a {type(item).__name__}, not an object"))
            continue
        nested = [k for k, v in item.items() if isinstance(v, dict | list)]
        if nested:
            out.append((i, f"{nested[0]}: a nested value, not a scalar"))
            continue
        # register_m3 as a JSON number is taken exactly (Decimal), as its decimal string
        out.append((i, {k: _m3(v) if k == "register_m3" else v for k, v in item.items()}))
    return out


def _m3(value: Any) -> Any:
    if isinstance(value, Decimal | int) and not isinstance(value, bool):
        return format(value, "f")
    return value
