"""SenML encoders (RFC 8428): the simulator's inverse of `decoder.senml`, JSON and CBOR."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal

import cbor2

from decoder.senml import LABEL_OF


def _json_value(value: object) -> str:
    """One field value as a JSON literal; Decimal keeps its exact digits (never a float)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            msg = f"{value} is not a SenML number"
            raise ValueError(msg)
        return format(value, "f")
    return json.dumps(value, ensure_ascii=False)


def _cbor_value(value: object) -> object:
    """Decimal -> int when whole, float when its shortest repr is exact, else tag 4."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else value
    return value


def encode_senml(records: Sequence[Mapping[str, object]], *, cbor: bool = False) -> bytes:
    """Records (field name -> value; numbers as int/Decimal) -> a SenML JSON or CBOR pack."""
    if cbor:
        return cbor2.dumps(
            [{LABEL_OF.get(key, key): _cbor_value(val) for key, val in r.items()} for r in records]
        )
    items = (
        "{" + ",".join(f"{json.dumps(key)}:{_json_value(val)}" for key, val in r.items()) + "}"
        for r in records
    )
    return ("[" + ",".join(items) + "]").encode()


def water_pack(
    base_name: str,
    readings: Sequence[tuple[int, int]],
    *,
    instance: int = 0,
    now_s: int | None = None,
) -> list[dict[str, object]]:
    """(read_at_s, total_ml) pairs -> LwM2M 3424 records (res 1, m3, exact Decimal values).

    With `now_s`, times are sent relative to now (bt = t0 - now_s < 2**28, RFC 8428
    §4.5.3), as a meter without a synchronised clock would.
    """
    if not readings:
        return []
    t0 = readings[0][0]
    base_t = t0 - now_s if now_s is not None else t0
    out: list[dict[str, object]] = []
    for i, (t, ml) in enumerate(readings):
        rec: dict[str, object] = {"n": "1", "v": Decimal(ml).scaleb(-6)}
        if i == 0:
            rec = {"bn": f"{base_name}/3424/{instance}/", "bt": base_t, "u": "m3", **rec}
        else:
            rec["t"] = t - t0
        out.append(rec)
    return out
