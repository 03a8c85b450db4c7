"""Request input within bounds: body size and JSON nesting, CSV read strictly, known query.

`BodyLimits` (ASGI middleware) answers 413 to a body over `max_bytes`, and 422 to a JSON
body that is not UTF-8 or nests deeper than `MAX_DEPTH`, before any route parses it:
Python's json recurses once per level, and a few thousand `[` end in RecursionError. It
does not parse the body (the route does, once); what FastAPI's parse would still answer
400 for (an integer of over 4,300 digits) is mapped to 422 in `api.errors`. `load_json`,
`read_csv` and `csv_rows` are the parsers of the routes that read their body themselves
(bulk imports); each raises `BodyError` with a detail that says which line and why.
`known_query`, an app-wide dependency, refuses query parameters the operation does not
declare: a typo (`?form=` for `?from=`) would otherwise be ignored and answer with the
defaults.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Collection, Iterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import UnprocessableError, problem
from decoder.limits import MAX_DEPTH, json_nesting  # 32 levels as for uplinks: enough


class BodyError(UnprocessableError):
    """A body the API cannot read: 422; the detail says which line and why."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason

    def errors(self) -> list[dict[str, Any]] | None:
        """The problem's `errors` member: where in the body, and why."""
        return [{"loc": ["body"], "line": self.line, "msg": self.reason, "type": "body_unreadable"}]


def check_json(raw: bytes, max_depth: int = MAX_DEPTH) -> str:
    """The text of `raw` if it is UTF-8 nested at most `max_depth` deep; BodyError else.

    The depth rule is the decoder's (`decoder.limits.json_nesting`): brackets inside
    strings do not count; the line named is the one where nesting first passes the limit.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 (byte 0x{raw[exc.start]:02x}); send UTF-8 JSON"
        raise BodyError(_line_of(raw, exc.start), why) from exc
    past_at = json_nesting(raw, max_depth).past_at
    if past_at is not None:
        why = f"the JSON nests deeper than {max_depth} levels; no request needs that many"
        raise BodyError(_line_of(raw, past_at), why)
    return text


def load_json(raw: bytes, max_depth: int = MAX_DEPTH, **loads: Any) -> Any:
    """The value of the UTF-8 JSON text `raw` (`json.loads` with `loads`, e.g.
    parse_float=Decimal); BodyError if it is not that, or too deep."""
    text = check_json(raw, max_depth)
    try:
        return json.loads(text, **loads)
    except json.JSONDecodeError as exc:
        raise BodyError(exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from exc
    except ValueError as exc:  # an integer of more than 4,300 digits, a refused constant
        raise BodyError(1, f"not valid JSON: {exc}") from exc


def _line_of(raw: bytes | str, offset: int) -> int:
    """1-based line of `offset`, counting LF, CRLF and a bare CR as line ends."""
    head = raw[:offset]
    if isinstance(head, bytes):
        return head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
    return head.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1


def csv_rows(
    raw: bytes, columns: Collection[str], *, fold_case: bool = False
) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header names of a UTF-8 CSV and its records as (line, fields), blank lines
    skipped; names lower-cased with `fold_case`.

    Lines may end in LF, CRLF or a bare CR. BodyError (which line, and why) for text that
    is not UTF-8, a NUL byte, a missing, blank, repeated or unknown column name (not in
    `columns`), and, while the records are read, a quote left open or stray or a field
    over 128 KiB. A record's width is the caller's to check.
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
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise BodyError(reader.line_num, f"unreadable CSV ({exc})") from exc
    if header is None:
        raise BodyError(1, "the CSV is empty; send a header row of its column names first")
    names = [h.strip().lower() if fold_case else h.strip() for h in header]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise BodyError(1, f"column names must be present and distinct, got {names}")
    unknown = [n for n in names if n not in columns]
    if unknown:
        why = f"unknown columns {unknown}; the header names fields of {sorted(columns)}"
        raise BodyError(1, why)

    def records() -> Iterator[tuple[int, list[str]]]:
        try:
            for fields in reader:
                if any(f.strip() for f in fields):  # else a blank line
                    yield reader.line_num, fields
        except csv.Error as exc:
            raise BodyError(reader.line_num, f"unreadable CSV ({exc})") from exc

    return names, records()


def read_csv(raw: bytes, columns: Collection[str]) -> list[dict[str, str]]:
    """Records of a UTF-8 CSV with a header row, as {column: value} without empty values.

    BodyError as `csv_rows`, and for a record with more fields than the header.
    """
    names, rows = csv_rows(raw, columns)
    records: list[dict[str, str]] = []
    for line, fields in rows:
        if len(fields) > len(names):
            why = (
                f"{len(fields)} fields but the header has {len(names)};"
                " quote values that contain a comma"
            )
            raise BodyError(line, why)
        records.append({n: v for n, v in zip(names, fields, strict=False) if v != ""})
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
            # UTF-8 and depth only: the route parses it (FastAPI answers broken JSON 422
            # itself; a non-UTF-8 body would be its 400)
            try:
                check_json(body, self.max_depth)
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
