"""JSON lines of a decoded batch, built column by column (the `nbmeter decode` output).

`json_lines(decoded)[i]` is, byte for byte, `json.dumps(view.records(decoded)[i],
ensure_ascii=False, default=str)`: the same keys in the same order, the same values. It
is built without a per-frame dict: each extra column is encoded once for all the frames
that carry it (`"name": value` cells), flag names and reading times are encoded once per
distinct value, and each line is one join of its cells. `tests/decoder/test_jsonl.py`
holds the two equal on the shared vectors and a mixed batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from json.encoder import encode_basestring  # the C speedup json.dumps itself uses

import numpy as np

from decoder.columns import Column, Decoded, ErrorCode, frame_flag_names
from decoder.view import flag_names, json_value, m3_text

__all__ = ["json_lines"]

_ERROR_NAMES = {int(code): code.name for code in ErrorCode}


def _encode(value: object) -> str:
    """One value as `json.dumps(json_value(value), ensure_ascii=False, default=str)` writes it."""
    kind = type(value)  # exact types: subclasses (IntEnum, np.str_) take json.dumps' path
    if kind is str and isinstance(value, str):
        return encode_basestring(value)
    if kind is Decimal and isinstance(value, Decimal):
        return encode_basestring(format(value, "f"))
    if kind is bool:
        return "true" if value else "false"
    if kind is int and isinstance(value, int):
        return int.__repr__(value)
    if value is None:
        return "null"
    return json.dumps(json_value(value), ensure_ascii=False, default=str)


def _cells(name: str, col: Column) -> list[tuple[int, str]]:
    """(frame, `"name": value`) for every frame that carries the column."""
    head = encode_basestring(name) + ": "
    n = len(col.values)
    rows = range(n) if col.present is None else np.flatnonzero(col.present).tolist()
    if col.render == "":  # the values themselves: one C call to Python objects
        values = col.values.tolist()
        return [(i, head + _encode(values[i])) for i in rows]
    return [(i, head + _encode(col.value(i))) for i in rows]


def _readings(decoded: Decoded) -> tuple[dict[int, list[int]], list[str], list[str]]:
    """(frame -> its reading rows, each reading's `"read_at": …, "flags": …` pair, each
    reading's `{"read_at": …, "register_m3": …, "flags": …}` object)."""
    frame_of = decoded.frame_index.tolist()
    by_frame: dict[int, list[int]] = {}
    for j, i in enumerate(frame_of):
        by_frame.setdefault(i, []).append(j)
    stamps = decoded.read_at_s.astype("datetime64[s]")
    iso = [f'"{t}Z"' for t in np.datetime_as_string(stamps, unit="s").tolist()]
    flag_text: dict[int, str] = {}
    for bits in set(decoded.flags.tolist()):  # a few distinct flag sets per batch
        flag_text[bits] = json.dumps(flag_names(bits), ensure_ascii=False)
    flags = [flag_text[b] for b in decoded.flags.tolist()]
    pairs = [f'"read_at": {t}, "flags": {f}' for t, f in zip(iso, flags, strict=True)]
    objects = [
        f'{{"read_at": {t}, "register_m3": "{m3_text(ml)}", "flags": {f}}}'
        for t, ml, f in zip(iso, decoded.register_ml.tolist(), flags, strict=True)
    ]
    return by_frame, pairs, objects


def json_lines(decoded: Decoded) -> list[str]:
    """One JSON text per input frame, equal to `json.dumps(records(decoded)[i], …)`."""
    n = decoded.n_frames
    by_frame, pairs, objects = _readings(decoded)
    read_at = decoded.read_at_s.tolist()
    # the total: the `total_m3` extra (sparse wins over the column), else the newest reading
    total: list[str | None] = [None] * n
    if (col := decoded.fields.get("total_m3")) is not None:
        for i, cell in _cells("total_m3", col):
            total[i] = cell
    for i, rare in decoded.sparse.items():
        if "total_m3" in rare:
            total[i] = '"total_m3": ' + _encode(rare["total_m3"])
    register = decoded.register_ml.tolist()
    for i, rows in by_frame.items():
        if total[i] is None:
            newest = max(rows, key=read_at.__getitem__)
            total[i] = f'"total_m3": "{m3_text(register[newest])}"'
    # the other extras, column by column, in `extra_of`'s order (a sparse value replaces
    # its column's in place; new sparse keys follow)
    skip = {"ok", "format", "address", "total_m3"}
    extra: list[list[str]] = [[] for _ in range(n)]
    names = [name for name in decoded.fields if name not in skip]
    for name in names:
        for i, cell in _cells(name, decoded.fields[name]):
            extra[i].append(cell)
    for i, rare in decoded.sparse.items():
        _merge_sparse(extra[i], names, decoded, i, rare, skip)
    notes = decoded.frame_flags_or_zero.tolist()
    codes = decoded.error_code.tolist()
    formats = decoded.format.tolist()
    meters = decoded.address_of_frame.tolist()
    messages = decoded.error_message.tolist()
    out: list[str] = []
    for i in range(n):
        code = codes[i]
        parts = [
            '"ok": true' if code == 0 else '"ok": false',
            '"format": ' + (_encode(formats[i]) if formats[i] else "null"),
            '"address": ' + (_encode(meters[i]) if meters[i] else "null"),
        ]
        if (head := total[i]) is not None:
            parts.append(head)
        parts.extend(extra[i])
        if notes[i]:
            parts.append('"decode_flags": ' + json.dumps(frame_flag_names(notes[i])))
        mine = by_frame.get(i, [])
        if len(mine) == 1:
            parts.append(pairs[mine[0]])
        elif mine:
            parts.append('"readings": [' + ", ".join(objects[j] for j in mine) + "]")
        if code:
            parts.append('"error": ' + _encode(messages[i]))
            parts.append(f'"error_code": {code}, "error_name": "{_ERROR_NAMES.get(code, "?")}"')
        out.append("{" + ", ".join(parts) + "}")
    return out


def _merge_sparse(
    cells: list[str],
    names: list[str],
    decoded: Decoded,
    i: int,
    rare: Mapping[str, object],
    skip: set[str],
) -> None:
    """Fold frame i's sparse extras into its cells as `dict.update` would order them."""
    present = [name for name in names if decoded.fields[name].has(i)]
    where = {name: k for k, name in enumerate(present)}
    for key, value in rare.items():
        if key in skip:
            continue
        cell = encode_basestring(str(key)) + ": " + _encode(value)
        if key in where:
            cells[where[key]] = cell
        else:
            where[key] = len(cells)
            cells.append(cell)
