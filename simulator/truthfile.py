"""The ground-truth files of a run: `truth.npz` (arrays) and `truth.json` (the manifest).

`save(directory, truth, uplinks, extra)` writes both; `load(directory)` reads them back
into an equal `Truth` and uplink list, which is what `sim verify` compares the backend
with. The manifest is readable by people: spec, fault rates, meters (OMS keys in hex),
faults with their expected handling, and `extra` (tenant, API URL, run summary).
Raises TruthFileError when the files are missing or from another format version.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from simulator.districts import District
from simulator.faults import Fault, Outcome
from simulator.fleet import Fleet, FleetSpec, Format, Kind, Meter, RegisterSpec, Transport
from simulator.schedule import Uplink
from simulator.truth import Truth

VERSION = 1
_UPLINK_INT_FIELDS = (
    "send_s", "meter", "claimed", "day", "first_h", "last_h", "clock_offset_s", "copies",
    "lost_transmissions", "latency_ms", "seq", "resend_of",
)  # fmt: skip


class TruthFileError(Exception):
    """The ground-truth files cannot be read (missing, damaged or another version)."""


def _meter_json(m: Meter) -> dict[str, Any]:
    out = dataclasses.asdict(m)
    out.update(kind=str(m.kind), format=str(m.format), transport=str(m.transport))
    out["oms_key"] = m.oms_key.hex() if m.oms_key else None
    return out


def _meter_from(obj: dict[str, Any]) -> Meter:
    return Meter(
        **{
            **obj,
            "kind": Kind(obj["kind"]),
            "format": Format(obj["format"]),
            "transport": Transport(obj["transport"]),
            "register": RegisterSpec(**obj["register"]),
            "oms_key": bytes.fromhex(obj["oms_key"]) if obj["oms_key"] else None,
        }
    )


def save(
    directory: Path, truth: Truth, uplinks: list[Uplink], extra: dict[str, Any] | None = None
) -> None:
    """Write truth.npz and truth.json into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ups: dict[str, Any] = {
        f"up_{f}": np.array([getattr(u, f) for u in uplinks], np.int64) for f in _UPLINK_INT_FIELDS
    }
    ups["up_corrupt"] = np.array([u.corrupt for u in uplinks], np.bool_)
    np.savez_compressed(
        directory / "truth.npz",
        initial_units=truth.initial_units,
        steps=truth.steps,
        flags=truth.flags,
        **ups,
    )
    manifest = {
        "version": VERSION,
        "spec": dataclasses.asdict(truth.fleet.spec),
        "rates": truth.rates,
        "meters": [_meter_json(m) for m in truth.meters],
        "faults": [f.to_json() for f in truth.faults],
        "districts": [d.to_json() for d in truth.districts],
        "uplink_text": [[str(u.outcome), u.expect, u.fault] for u in uplinks],
        "extra": extra or {},
    }
    (directory / "truth.json").write_text(json.dumps(manifest, indent=1) + "\n")


def load_extra(directory: Path) -> dict[str, Any]:
    """The manifest's `extra` in `directory` ({} when there is no manifest yet)."""
    try:
        manifest = json.loads((directory / "truth.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TruthFileError(f"cannot read ground truth in {directory}: {exc}") from exc
    return dict(manifest.get("extra") or {})


def load(directory: Path) -> tuple[Truth, list[Uplink], dict[str, Any]]:
    """(truth, uplinks, extra) saved in `directory`; raises TruthFileError."""
    try:
        manifest = json.loads((directory / "truth.json").read_text())
        arrays = np.load(directory / "truth.npz")
    except (OSError, ValueError) as exc:
        raise TruthFileError(f"cannot read ground truth in {directory}: {exc}") from exc
    if manifest.get("version") != VERSION:
        raise TruthFileError(f"{directory}: ground truth version {manifest.get('version')}")
    spec_obj = dict(manifest["spec"])
    spec_obj["report_window_s"] = tuple(spec_obj["report_window_s"])
    fleet = Fleet(FleetSpec(**spec_obj), tuple(_meter_from(m) for m in manifest["meters"]))
    truth = Truth(
        fleet=fleet,
        rates={k: float(v) for k, v in manifest["rates"].items()},
        initial_units=arrays["initial_units"],
        steps=arrays["steps"],
        flags=arrays["flags"],
        faults=tuple(Fault.from_json(f) for f in manifest["faults"]),
        districts=tuple(District.from_json(d) for d in manifest.get("districts", [])),
    )
    # each NpzFile item access reads and inflates the array again: take the columns once;
    # files written before resends were recorded have no resend_of column (all -1)
    columns = {f: arrays[f"up_{f}"].tolist() for f in _UPLINK_INT_FIELDS if f"up_{f}" in arrays}
    corrupt = arrays["up_corrupt"].tolist()
    uplinks = [
        Uplink(
            **{f: int(col[i]) for f, col in columns.items()},
            outcome=Outcome(outcome),
            expect=expect,
            fault=fault,
            corrupt=bool(corrupt[i]),
        )
        for i, (outcome, expect, fault) in enumerate(manifest["uplink_text"])
    ]
    return truth, uplinks, dict(manifest.get("extra") or {})
