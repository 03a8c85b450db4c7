"""The billing core stays sans-I/O: it imports the standard library's pure modules, numpy
and decoder's constants only (never asyncio, a database, logging, FastAPI or pydantic)."""

from __future__ import annotations

import ast
from pathlib import Path

import billing

ALLOWED = {
    "__future__",
    "bisect",
    "collections",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "itertools",
    "typing",
    "zoneinfo",
    "numpy",
    "billing",
    "decoder",
}


def test_billing_imports_nothing_with_io() -> None:
    """Every import in billing/ names an allowed top-level module (decoder.columns only)."""
    found: dict[str, set[str]] = {}
    for path in sorted(Path(billing.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name, set()).add(path.name)
    assert found, "no imports found: wrong folder?"
    bad = {n: files for n, files in found.items() if n.split(".")[0] not in ALLOWED}
    assert not bad, f"billing/ imports {bad}"
    decoder = {n for n in found if n.split(".")[0] == "decoder"}
    assert decoder <= {"decoder.columns"}
