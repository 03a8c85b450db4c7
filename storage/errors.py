"""Errors raised by storage on purpose. Callers catch these, not asyncpg's or psycopg's.

StorageError
├── StorageUnavailableError  transient (connection refused, pool closed, timeout): retry
└── SchemaError              the database is not one nbmeter can use (no TimescaleDB,
                             migrations missing or newer than this code): fatal
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error storage raises on purpose."""


class StorageUnavailableError(StorageError):
    """The database cannot be reached right now; the same call may succeed later."""


class SchemaError(StorageError):
    """The database lacks what nbmeter needs; the message says what to do."""
