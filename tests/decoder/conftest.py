"""Make `import decoder` mean the package, not this same-named tests/decoder folder.

pytest puts `tests/` on sys.path (rootdir conftest, prepend mode); `tests/decoder` has no
`__init__.py`, so without the repo root ahead of it `decoder` resolves to a namespace
package whose `__init__` (the format registry, `decode_batch`) never runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)
_loaded = sys.modules.get("decoder")
if _loaded is not None and getattr(_loaded, "__file__", None) is None:
    for name in [m for m in sys.modules if m == "decoder" or m.startswith("decoder.")]:
        del sys.modules[name]
import decoder  # noqa: E402, F401  (registers the formats)
