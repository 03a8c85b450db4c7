"""A historical read import's body (CSV or a JSON array) as rows to enter, checked row by row.

`parse(body, kind)` returns the rows that are well-formed as `storage.manual_reads`'s
EnteredRead and a (line, reason) for every other one; the caller refuses the whole import
when there is any. Pure: bytes in, rows out. Bounds: `MAX_ROWS` rows, JSON nesting is
never followed (an array of flat objects), CSV fields at most `_MAX_FIELD` characters.

CSV: UTF-8, a header row naming the columns (meter_id or address, read_at, register_m3 or
register_ml, optionally quality and note), an empty cell is an absent value; `line` is the
row's line in the file (the header is line 1). JSON: an array of objects with the same
keys; `line` is the object's position in the array (from 1). Numbers in JSON are kept
exact (Decimal), never floats.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Literal

from pydantic import ValidationError

from api.schemas_manual import ImportRow
from storage.manual_reads import EnteredRead

Kind = Literal["csv", "json"]
MAX_ROWS = 100_000
_MAX_FIELD = 1024
_COLUMNS = frozenset(ImportRow.model_fields)
Problem = tuple[int, str]


class BodyError(ValueError):
    """The body cannot be read as rows at all (encoding, syntax, header); `line` says where."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


class TooManyRowsError(BodyError):
    """The body holds more than MAX_ROWS rows."""


def parse(body: bytes, kind: Kind) -> tuple[list[EnteredRead], list[Problem]]:
    """The body's well-formed rows and the problems of the others; BodyError if unreadable."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body[: exc.start].count(b"\n") + 1
        raise BodyError(line, f"not UTF-8 at byte {exc.start}: {exc.reason}") from exc
    raws = _csv_rows(text) if kind == "csv" else _json_rows(text)
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


def _csv_rows(text: str) -> Iterable[tuple[int, dict[str, str] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise BodyError(1, "empty CSV: the first line names the columns")
        names = [h.strip().lower() for h in header]
        unknown = [n for n in names if n not in _COLUMNS]
        if unknown or len(set(names)) < len(names):
            msg = (
                f"header: unknown or repeated columns {unknown or names}: use"
                f" {', '.join(sorted(_COLUMNS))}"
            )
            raise BodyError(1, msg)
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue  # blank line
            if len(cells) != len(names):
                yield reader.line_num, f"{len(cells)} cells, the header has {len(names)}"
                continue
            if any(len(c) > _MAX_FIELD for c in cells):
                yield reader.line_num, f"a cell is longer than {_MAX_FIELD} characters"
                continue
            yield (
                reader.line_num,
                {n: c.strip() for n, c in zip(names, cells, strict=True) if c.strip()},
            )
    except csv.Error as exc:
        raise BodyError(reader.line_num + 1, f"unreadable CSV: {exc}") from exc


def _no_constant(name: str) -> Any:
    msg = f"{name} is not a number"
    raise ValueError(msg)


def _json_rows(text: str) -> Iterable[tuple[int, dict[str, Any] | str]]:
    try:
        data = json.loads(text, parse_float=Decimal, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "too deep"
        line = exc.lineno if isinstance(exc, json.JSONDecodeError) else 1
        raise BodyError(line, f"not JSON: {reason}") from exc
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
