"""What several commands need from the environment."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from storage.errors import StorageError
from storage.settings import DatabaseSettings


def database_url() -> str:
    """NBMETER_DATABASE_URL (storage.settings), or the local stack's URL when it is not set."""
    try:
        return DatabaseSettings().database_url
    except ValidationError:
        pass
    from nbmeter.stack.config import load_config
    from nbmeter.stack.control import database_url as stack_url

    return stack_url(load_config())


def run_on_database(main: Callable[[str], Coroutine[Any, Any, int]]) -> int:
    """Run `main(database_url())`; a storage error is printed and exits 1."""
    try:
        return asyncio.run(main(database_url()))
    except StorageError as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
