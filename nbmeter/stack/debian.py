"""Debian plumbing: package installs, the apt mirror, and the Debian 13 root for Debian 12.

Debian 13 (trixie) packages TimescaleDB 2.19 (Apache edition) as
postgresql-17-timescaledb; Debian 12 does not. There we build a minimal trixie root
with debootstrap from the mirror this machine's apt already uses (never a hard-coded
host), install PostgreSQL 17 + TimescaleDB in it, and run the server chrooted on a
loopback port. The root is built once (about a minute) and reused.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from nbmeter.stack.config import PG_MAJOR, StackError, say

_APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
_READY_MARK = ".nbmeter-root-ready"
PG_PACKAGES = (f"postgresql-{PG_MAJOR}", f"postgresql-{PG_MAJOR}-timescaledb")


def run(cmd: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
    """Run `cmd`; on failure raise StackError naming `what` with the command's last output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        msg = f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
        raise StackError(msg)
    return proc.stdout


def is_root() -> bool:
    """True when running as root (package installs and chroot need it)."""
    return os.geteuid() == 0


def codename() -> str:
    """This host's Debian codename ('bookworm', 'trixie', ...), or '' when not Debian."""
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return ""
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.MULTILINE)
    return match.group(1) if match and "debian" in text.lower() else ""


def apt_install(packages: list[str], *, root: Path | None = None) -> None:
    """Install Debian packages on the host (or inside `root`), refreshing lists once."""
    if not is_root():
        where = f" in {root}" if root else ""
        msg = f"need root to install {' '.join(packages)}{where}: run as root or install them"
        raise StackError(msg)
    prefix = ["chroot", str(root)] if root else []
    say(f"installing {' '.join(packages)}{' in the Debian 13 root' if root else ''} ...")
    run([*prefix, "apt-get", "update", "-q"], what="apt-get update", env=_APT_ENV)
    run(
        [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        what=f"apt-get install {' '.join(packages)}",
        env=_APT_ENV,
    )


def package_available(name: str) -> bool:
    """True when the host's apt can install `name` (it has a candidate version)."""
    if not shutil.which("apt-cache"):
        return False
    proc = subprocess.run(
        ["apt-cache", "policy", name], capture_output=True, text=True, check=False
    )
    match = re.search(r"Candidate:\s*(\S+)", proc.stdout)
    return bool(match and match.group(1) != "(none)")


def debian_mirror() -> str:
    """The Debian archive URI this machine's apt uses (sources.list or deb822 .sources)."""
    candidates: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        text = path.read_text(encoding="utf-8", errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Enabled:\s*no", stanza, re.MULTILINE | re.IGNORECASE):
                continue
            uris = re.search(r"^URIs:\s*(.+)$", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and not _only_security(suites.group(1).split()):
                candidates.extend(uris.group(1).split())
    lists = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match and not _only_security([match.group(2)]):
                candidates.append(match.group(1))
    for uri in candidates:
        if re.search(r"/debian/?$", uri) and "security" not in uri:
            return uri.rstrip("/")
    msg = (
        "found no Debian archive in /etc/apt/sources.list*; set NBMETER_STACK=docker, or "
        "point NBMETER_DATABASE_URL at a TimescaleDB server"
    )
    raise StackError(msg)


def _only_security(suites: list[str]) -> bool:
    return all(s.endswith(("-security", "/updates")) for s in suites)


def ensure_trixie_root(root: Path) -> None:
    """Build (once) a minimal Debian 13 root at `root` holding PostgreSQL 17 + TimescaleDB."""
    if (root / _READY_MARK).exists():
        return
    if not is_root():
        msg = "building the Debian 13 root for TimescaleDB needs root (debootstrap, chroot)"
        raise StackError(msg)
    started = time.monotonic()
    if not shutil.which("debootstrap"):
        apt_install(["debootstrap"])
    mirror = debian_mirror()
    if not (root / "usr/bin/apt-get").exists():
        if root.exists():
            shutil.rmtree(root)  # a half-made root from an interrupted run
        root.parent.mkdir(parents=True, exist_ok=True)
        say("building a minimal Debian 13 root with debootstrap (first run only, ~1 min) ...")
        run(
            ["debootstrap", "--variant=minbase", "trixie", str(root), mirror],
            what="debootstrap of Debian 13",
        )
    # services must not start inside the root at install time: we start PostgreSQL ourselves
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
    policy.chmod(0o755)
    mount_pseudo_filesystems(root)
    apt_install(list(PG_PACKAGES), root=root)
    (root / _READY_MARK).write_text("ok\n", encoding="utf-8")
    say(f"Debian 13 root ready in {time.monotonic() - started:.0f} s")


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split()[4] == target for line in fh)


def mount_pseudo_filesystems(root: Path) -> None:
    """Mount /proc and bind /dev into `root` unless already there (PostgreSQL needs both)."""
    proc, dev = root / "proc", root / "dev"
    if not _mounted(proc):
        run(["mount", "-t", "proc", "proc", str(proc)], what="mounting /proc in the root")
    if not _mounted(dev):
        run(["mount", "--bind", "/dev", str(dev)], what="binding /dev into the root")


def unmount_pseudo_filesystems(root: Path) -> None:
    """Undo `mount_pseudo_filesystems` (lazily, so a busy mount cannot fail `down`)."""
    for sub in ("dev", "proc"):
        path = root / sub
        if path.exists() and _mounted(path):
            subprocess.run(["umount", "-l", str(path)], check=False)
