"""The database every component connects to: NBMETER_DATABASE_URL, defined here only.

ApiSettings and CollectorSettings extend DatabaseSettings; the `nbmeter` commands read it
and fall back to the local stack's URL when it is not set.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatabaseSettings(BaseSettings):
    """NBMETER_DATABASE_URL, required: `eval "$(nbmeter stack env)"` sets it."""

    model_config = SettingsConfigDict(env_prefix="NBMETER_", extra="ignore")

    database_url: str = Field(
        min_length=1, description="PostgreSQL/TimescaleDB DSN (NBMETER_DATABASE_URL)"
    )
