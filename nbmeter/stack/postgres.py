"""The project's PostgreSQL 17 + TimescaleDB server, run from host binaries or a chroot.

Both ways run the same `pg_ctl` as the `postgres` user; they differ only in the prefix
that reaches the binaries (`chroot --userspec` into the Debian 13 root, or `runuser` on
a Debian 13 host) and in where the data directory lives as seen from the host.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from nbmeter.stack.config import DB_NAME, DB_USER, PG_MAJOR, StackConfig, StackError, say
from nbmeter.stack.debian import run

_BIN = f"/usr/lib/postgresql/{PG_MAJOR}/bin"

# Durable (fsync, synchronous_commit on: the collector acknowledges only committed data),
# sized for a 2-core/24 GiB machine ingesting in large COPY batches.
_SETTINGS = """\
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '/tmp'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
timescaledb.max_background_workers = 8
max_connections = 300
shared_buffers = '2GB'
work_mem = '32MB'
maintenance_work_mem = '512MB'
max_wal_size = '8GB'
checkpoint_timeout = '15min'
wal_compression = on
fsync = on
synchronous_commit = on
log_min_messages = warning
"""


@dataclass(frozen=True)
class Server:
    """How to reach one PostgreSQL installation: a command prefix and a data directory."""

    prefix: tuple[str, ...]  # runs a command as postgres where the binaries are
    data_dir: str  # as the server sees it
    host_data_dir: Path  # the same directory as this process sees it
    port: int

    def _cmd(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def initialised(self) -> bool:
        """True once initdb has run."""
        return (self.host_data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        """True when pg_ctl sees a live postmaster for the data directory."""
        proc = subprocess.run(
            self._cmd(f"{_BIN}/pg_ctl", "status", "-D", self.data_dir),
            capture_output=True,
            check=False,
        )
        return proc.returncode == 0

    def init(self, password: str) -> None:
        """Create the cluster: loopback TCP with SCRAM passwords, local socket trust."""
        say("initialising the PostgreSQL data directory ...")
        parent = self.host_data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._chown(parent)
        pwfile = parent / ".pwfile"
        pwfile.write_text(password + "\n", encoding="utf-8")
        self._chown(pwfile)
        seen_pwfile = str(Path(self.data_dir).parent / ".pwfile")
        try:
            run(
                self._cmd(
                    f"{_BIN}/initdb",
                    "-D",
                    self.data_dir,
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={seen_pwfile}",
                ),
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _chown(self, path: Path) -> None:
        run(self._root_cmd("chown", "postgres:postgres", path), what=f"chown {path}")

    def _root_cmd(self, *args: object) -> list[str]:
        if self.prefix[0] == "chroot":
            root = Path(self.prefix[2])
            return ["chroot", str(root), *(self._inside(root, a) for a in args)]
        return [str(a) for a in args]

    @staticmethod
    def _inside(root: Path, arg: object) -> str:
        if isinstance(arg, Path) and arg.is_relative_to(root):
            return "/" + str(arg.relative_to(root))
        return str(arg)

    def configure(self) -> None:
        """Write nbmeter's settings into the cluster (included from postgresql.conf)."""
        conf = self.host_data_dir / "nbmeter.conf"
        conf.write_text(_SETTINGS.format(port=self.port), encoding="utf-8")
        main = self.host_data_dir / "postgresql.conf"
        text = main.read_text(encoding="utf-8")
        if "include_if_exists = 'nbmeter.conf'" not in text:
            main.write_text(text + "\ninclude_if_exists = 'nbmeter.conf'\n", encoding="utf-8")
        self._chown(conf)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = str(Path(self.data_dir).parent / "postgresql.log")
        run(
            self._cmd(f"{_BIN}/pg_ctl", "start", "-w", "-t", "120", "-D", self.data_dir, "-l", log),
            what=f"starting PostgreSQL (log: {self.host_data_dir.parent / 'postgresql.log'})",
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown: running transactions roll back)."""
        if self.running():
            run(
                self._cmd(f"{_BIN}/pg_ctl", "stop", "-m", "fast", "-w", "-D", self.data_dir),
                what="stopping PostgreSQL",
            )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the postgres superuser over the local socket; return stdout."""
        return run(
            self._cmd(
                f"{_BIN}/psql",
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "/tmp",
                "-p",
                str(self.port),
                "-d",
                database,
                "-c",
                sql,
            ),
            what="psql",
        )

    def ensure_database(self, password: str) -> None:
        """Create the nbmeter role (superuser: tests create databases) and database."""
        quoted = password.replace("'", "''")
        exists = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'").strip()
        verb = "ALTER" if exists else "CREATE"
        self.psql(f"{verb} ROLE {DB_USER} LOGIN SUPERUSER PASSWORD '{quoted}'")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'").strip():
            self.psql(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        self.psql("CREATE EXTENSION IF NOT EXISTS timescaledb", database=DB_NAME)

    def version(self) -> str:
        """'PostgreSQL x.y, TimescaleDB a.b.c (license)' of the running server."""
        out = self.psql(
            "SELECT split_part(current_setting('server_version'), ' ', 1) || ' ' || extversion"
            " || ' ' || current_setting('timescaledb.license') FROM pg_extension"
            " WHERE extname = 'timescaledb'",
            database=DB_NAME,
        ).split()
        return f"PostgreSQL {out[0]}, TimescaleDB {out[1]} ({out[2]})" if out else "?"


def chroot_server(cfg: StackConfig) -> Server:
    """The server inside the Debian 13 root; data under the root's /srv/nbmeter."""
    inside = f"/srv/nbmeter/pg{PG_MAJOR}"
    return Server(
        prefix=("chroot", "--userspec=postgres:postgres", str(cfg.root)),
        data_dir=inside,
        host_data_dir=cfg.root / inside.lstrip("/"),
        port=cfg.pg_port,
    )


def native_server(cfg: StackConfig) -> Server:
    """The server from the host's Debian 13 packages.

    Its data lives in the postgres user's own home (/var/lib/postgresql), since the
    postgres user cannot enter root's home where the rest of the state is kept.
    """
    data = Path("/var/lib/postgresql/nbmeter") / f"pg{PG_MAJOR}-{cfg.pg_port}" / "data"
    return Server(
        prefix=("runuser", "-u", "postgres", "--"),
        data_dir=str(data),
        host_data_dir=data,
        port=cfg.pg_port,
    )


def bring_up(server: Server, password: str) -> str:
    """Initialise, configure and start `server` as needed; return what was done."""
    done = "already running"
    if not server.initialised():
        server.init(password)
        done = "initialised and started"
    server.configure()
    if not server.running():
        say(f"starting PostgreSQL {PG_MAJOR} + TimescaleDB on 127.0.0.1:{server.port} ...")
        server.start()
        done = done if done != "already running" else "started"
    deadline = time.monotonic() + 60
    while True:
        try:
            server.ensure_database(password)
            break
        except StackError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return done
