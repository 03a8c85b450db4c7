"""Driver files from disk: the I/O shell around `decoder.drivers` (which reads no files).

`install_directory(path)` reads the drivers directory: `path/*.toml` apply to every
tenant's frames, `path/<tenant slug>/*.toml` only to that tenant's (installed in the
tenant's `decoder.drivers.scope`, which the store decodes its frames in). It validates
every file and checks its golden frames, then installs them all, or none: one malformed
file refuses the lot with a `DriverError` naming the file and line, so a collector never
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


def _read_all(paths: Sequence[Path]) -> list[Driver]:
    """Every file of `paths` read and checked; DriverError also for two of one name."""
    loaded = [read_driver(p) for p in paths]
    names = [d.name for d in loaded]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DriverError(f"two driver files are named {dup!r}: {[str(p) for p in paths]}")
    return loaded


def install_files(paths: Sequence[Path], *, replace: bool = False) -> list[Driver]:
    """Read all of `paths`, then install them (all or none); `replace` lets a file take
    the place of an installed driver of the same name."""
    loaded = _read_all(paths)
    for driver in loaded:
        if replace:
            drivers.uninstall(driver.name)
        drivers.install(driver)
    return loaded


def install_directory(directory: Path) -> dict[str | None, list[Driver]]:
    """Install the drivers directory (see the module docstring): tenant slug (None: every
    tenant) -> its drivers. DriverError, with nothing installed, if a file is bad or a
    name is taken in its scope."""
    if not directory.is_dir():
        raise DriverError(f"{directory}: the drivers directory does not exist")
    found: dict[str | None, list[Path]] = {None: sorted(directory.glob("*.toml"))}
    for sub in sorted(directory.iterdir()):
        if sub.is_dir() and not sub.name.startswith("."):
            found[sub.name] = sorted(sub.glob("*.toml"))
    loaded = {tenant: _read_all(paths) for tenant, paths in found.items()}
    for tenant, mine in loaded.items():
        taken = {d.name: d.source for d in drivers.installed(tenant)}
        for driver in mine:
            if driver.name in taken:
                msg = f"{driver.source}: driver name {driver.name!r} already installed"
                raise DriverError(f"{msg} (from {taken[driver.name]})")
    for tenant, mine in loaded.items():
        for driver in mine:
            drivers.install(driver, tenant)
    return loaded
