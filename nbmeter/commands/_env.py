"""What several commands need from the environment."""

from __future__ import annotations

import os


def database_url() -> str:
    """NBMETER_DATABASE_URL, or the local stack's URL when it is not set."""
    url = os.environ.get("NBMETER_DATABASE_URL")
    if url:
        return url
    from nbmeter.stack.config import load_config
    from nbmeter.stack.control import database_url as stack_url

    return stack_url(load_config())
