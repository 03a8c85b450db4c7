"""Driver files from disk: the I/O shell around `decoder.drivers` (which reads no files).

`install_directory(path)` reads every `*.toml` in a directory (sorted by name), validates
each and checks its golden frames, then installs them all, or none: one malformed file
refuses the lot with a `DriverError` naming the file and line, so a collector never
starts with half a tenant's models. `install_files(paths, replace=True)` is the CLI's
`--driver`: a file may stand in for a shipped driver of the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from decoder import drivers
from decoder.drivers import Driver, DriverError


def read_driver(path: Path) -> Driver:
    """One driver file, validated and golden-checked; DriverError if unreadable or bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DriverError(f"{path}: cannot read the driver file: {exc}") from exc
    return drivers.load(text, str(path))


def install_files(paths: Sequence[Path], *, replace: bool = False) -> list[Driver]:
    """Read all of `paths`, then install them (all or none); `replace` lets a file take
    the place of an installed driver of the same name."""
    loaded = [read_driver(p) for p in paths]
    names = [d.name for d in loaded]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DriverError(f"two driver files are named {dup!r}: {[str(p) for p in paths]}")
    for driver in loaded:
        if replace:
            drivers.uninstall(driver.name)
        drivers.install(driver)
    return loaded


def install_directory(directory: Path) -> list[Driver]:
    """Install every `*.toml` driver file of `directory`; DriverError if one is bad."""
    if not directory.is_dir():
        raise DriverError(f"{directory}: the drivers directory does not exist")
    return install_files(sorted(directory.glob("*.toml")))
