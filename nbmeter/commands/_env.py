"""What several commands need from the environment."""

from __future__ import annotations

from pydantic import ValidationError

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
