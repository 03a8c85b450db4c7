"""Errors raised by storage on purpose. Callers catch these, not asyncpg's or psycopg's.

StorageError                 a database error that is neither of these: a bug to fix
├── StorageUnavailableError  transient (connection refused or lost, pool closing, server
│                            shutting down, out of resources, deadlock, serialization,
│                            timeout): the same call may succeed later, retry it
├── RowRefusedError          the database refused the data (a constraint, a value out of
│                            its column's range, text it cannot hold): the same call fails
│                            again, set the data aside
└── SchemaError              the database is not one nbmeter can use (no TimescaleDB,
                             migrations missing or newer than this code): fatal

`storage.pool.translated()` is the one place the database driver's exceptions become these.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error storage raises on purpose."""


class StorageUnavailableError(StorageError):
    """The database cannot be reached right now; the same call may succeed later."""


class RowRefusedError(StorageError):
    """The database refused the rows as they are; sending them again fails again."""


class SchemaError(StorageError):
    """The database lacks what nbmeter needs; the message says what to do."""
