"""Request input within bounds: body size and JSON nesting, CSV read strictly, known query.

`BodyLimits` (ASGI middleware) answers 413 to a body over `max_bytes`, and 422 to a JSON
body that is not UTF-8 JSON or nests deeper than `MAX_DEPTH`, before any route parses it:
Python's json recurses once per level, and a few thousand `[` end in RecursionError. `load_json` and
`read_csv` are the parsers of the routes that read their body themselves (bulk import);
each raises `BodyError` with a detail that says which line and why. `known_query`, an
app-wide dependency, refuses query parameters the operation does not declare: a typo
(`?form=` for `?from=`) would otherwise be ignored and answer with the defaults.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Collection
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import UnprocessableError, problem
from decoder.limits import MAX_DEPTH  # 32 levels, as for uplinks: no request needs more

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # JSON strings, escapes included
_CHUNK = 1 << 20
_STEP = np.zeros(256, np.int8)  # +1 opens a level, -1 closes one
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


class BodyError(UnprocessableError):
    """A body the API cannot read: 422; the detail says which line and why."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line}: {why}")
        self.line = line
        self.why = why

    def errors(self) -> list[dict[str, Any]] | None:
        """The problem's `errors` member: where in the body, and why."""
        return [{"loc": ["body"], "line": self.line, "msg": self.why, "type": "body_unreadable"}]


def json_too_deep_at(raw: bytes, max_depth: int = MAX_DEPTH) -> int | None:
    """The line where the JSON text `raw` first nests arrays/objects deeper than
    `max_depth`, or None when it never does.

    Brackets inside strings do not count (a JSON string holds no raw line break, so lines
    survive blanking them). The same rule as decoder.limits.json_depth, which is tuned for
    64 KiB uplinks (one int64 per bracket at once: 1.4 s and 128 MB for 16 MiB of `[]`);
    a body of up to 16 MiB, read before its key is checked, is scanned here in 1 MiB
    chunks instead (0.2 s, 8 MB). tests/api/test_bad_input.py holds the two equal.
    """
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return None
    text = _STRING.sub(b'""', raw)
    depth = 0
    for at in range(0, len(text), _CHUNK):
        levels = depth + np.cumsum(
            _STEP[np.frombuffer(text, np.uint8, min(_CHUNK, len(text) - at), at)], dtype=np.int64
        )
        deep = np.flatnonzero(levels > max_depth)
        if deep.size:
            return text.count(b"\n", 0, at + int(deep[0])) + 1
        depth = int(levels[-1])
    return None


def load_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The value of the UTF-8 JSON text `raw`; BodyError if it is not that or too deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 (byte 0x{raw[exc.start]:02x}); send UTF-8 JSON"
        raise BodyError(_line_of(raw, exc.start), why) from exc
    deep_line = json_too_deep_at(raw, max_depth)
    if deep_line is not None:
        why = f"the JSON nests deeper than {max_depth} levels; no request needs that many"
        raise BodyError(deep_line, why)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyError(exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from exc
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise BodyError(1, f"not valid JSON: {exc}") from exc


def _line_of(raw: bytes | str, offset: int) -> int:
    """1-based line of `offset`, counting LF, CRLF and a bare CR as line ends."""
    head = raw[:offset]
    if isinstance(head, bytes):
        return head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
    return head.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1


def read_csv(raw: bytes, columns: Collection[str]) -> list[dict[str, str]]:
    """Records of a UTF-8 CSV with a header row, as {column: value} without empty values.

    Lines may end in LF, CRLF or a bare CR. BodyError (which line, and why) for text that
    is not UTF-8, a NUL byte, a quote left open or stray, a field over 128 KiB, a missing,
    blank, repeated or unknown column name (not in `columns`), or a record with more
    fields than the header.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        raise BodyError(_line_of(raw, exc.start), why) from exc
    if "\x00" in text:
        raise BodyError(_line_of(text, text.index("\x00")), "a NUL byte; no field may hold one")
    # newline="" lets the csv module see each line end as written (as csv's docs require);
    # strict refuses what lenient parsing would silently reshape (a quote inside a field)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[dict[str, str]] = []
    try:
        header = next(reader, None)
        if header is None:
            raise BodyError(1, "the CSV is empty; send a header row of meter fields first")
        names = [h.strip() for h in header]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise BodyError(1, f"column names must be present and distinct, got {names}")
        unknown = [n for n in names if n not in columns]
        if unknown:
            why = f"unknown columns {unknown}; the header names fields of {sorted(columns)}"
            raise BodyError(1, why)
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # a blank line
            if len(fields) > len(names):
                why = (
                    f"{len(fields)} fields but the header has {len(names)};"
                    " quote values that contain a comma"
                )
                raise BodyError(reader.line_num, why)
            records.append({n: v for n, v in zip(names, fields, strict=False) if v != ""})
    except csv.Error as exc:
        raise BodyError(reader.line_num, f"unreadable CSV ({exc})") from exc
    return records


class BodyLimits:
    """ASGI middleware: 413 over `max_bytes`, 422 for JSON nested deeper than `max_depth`."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int = MAX_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    def _too_large(self) -> str:
        return f"the body is larger than {self.max_bytes} bytes; send it in parts"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the body's size (and a JSON body's depth) before the route sees it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await problem(Request(scope), 413, "payload-too-large", self._too_large())(
                scope, receive, send
            )
            return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type == b"application/json" or content_type.endswith(b"+json"):
            await self._json(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    async def _json(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Buffer the JSON body (the route would anyway), check it, then replay it."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                await problem(Request(scope), 413, "payload-too-large", self._too_large())(
                    scope, receive, send
                )
                return
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        if body:
            # parsed here once more, so that what FastAPI would answer 400 for (not UTF-8,
            # an integer over 4,300 digits) is a 422 like any other unreadable body
            try:
                load_json(body, self.max_depth)
            except BodyError as exc:
                answer = problem(
                    Request(scope), 422, "validation-error", exc.detail, errors=exc.errors()
                )
                await answer(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _query_names(request: Request) -> dict[tuple[str, str], dict[str, bool]]:
    """(METHOD, path) -> {query parameter: whether it may repeat} of its OpenAPI operation."""
    names: dict[tuple[str, str], dict[str, bool]] | None = getattr(
        request.app.state, "query_names", None
    )
    if names is None:
        names = {
            (method.upper(), path): {
                p["name"]: "array" in json.dumps(p.get("schema", {}))
                for p in op.get("parameters", ())
                if p.get("in") == "query"
            }
            for path, ops in request.app.openapi()["paths"].items()
            for method, op in ops.items()
        }
        request.app.state.query_names = names
    return names


async def known_query(request: Request) -> None:
    """422 naming each query parameter the operation does not declare, or that is given
    twice without being a list (FastAPI would silently keep the last)."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    declared = _query_names(request).get((request.method, getattr(route, "path", "")))
    if declared is None:
        return  # not a documented operation (/docs, /openapi.json)
    takes = ", ".join(sorted(declared)) or "none"
    given = Counter(name for name, _ in request.query_params.multi_items())
    errors = [
        {
            "loc": ("query", name),
            "msg": f"unknown query parameter; this operation takes: {takes}",
            "type": "extra_forbidden",
        }
        for name in sorted(set(given) - set(declared))
    ] + [
        {
            "loc": ("query", name),
            "msg": f"given {count} times; give it once",
            "type": "repeated",
        }
        for name, count in sorted(given.items())
        if count > 1 and name in declared and not declared[name]
    ]
    if errors:
        raise RequestValidationError(errors)
