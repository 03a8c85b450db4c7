"""API settings from the environment (prefix `NBMETER_`); pass an instance to create_app."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from billing.boundary import Tuning
from storage.settings import DatabaseSettings


class ApiSettings(DatabaseSettings):
    """Settings of the billing API, database_url included; other NBMETER_ variables are ignored."""

    model_config = SettingsConfigDict(env_prefix="NBMETER_", extra="ignore")

    api_pool_min: int = Field(2, ge=1)
    api_pool_max: int = Field(10, ge=1)
    # a reading within this many seconds of a boundary is the boundary's actual read
    actual_window_s: int = Field(3600, ge=0, le=86400)
    # an entered (manual or imported) read dated more than this after now is refused; a
    # device reading dated more than storage.rows.FUTURE_TOLERANCE_S after it was received
    # is flagged clock_ahead at ingest and left out of billing
    future_tolerance_s: int = Field(300, ge=0)
    # verified keys are cached this long; a revocation still takes effect at once (NOTIFY)
    key_cache_ttl_s: float = Field(30.0, ge=0)
    # ... and only this long while the NOTIFY listener is disconnected
    key_cache_fallback_ttl_s: float = Field(1.0, ge=0)
    # the listener's connection is checked this often (a silent loss is found within 2x)
    key_listen_check_s: float = Field(2.0, gt=0, le=60)
    # a bulk export runs this many COPYs at once over successive segments of the fleet
    # (each boundary read costs server CPU and one backend uses one core)
    export_connections: int = Field(2, ge=1, le=16)
    # a request body larger than this is refused (413): a 10,000-meter import is ~3 MB
    max_body_bytes: int = Field(16 << 20, ge=1024)
    # VEE: a gap between readings longer than this is reported
    max_gap_h: int = Field(48, ge=1)
    # seals webhook signing secrets (the collector's key: its dispatcher opens them)
    credentials_key: SecretStr | None = None
    # VEE: equal registers spanning at least this many days are a zero-consumption streak
    zero_streak_days: int = Field(3, ge=1)

    def tuning(self) -> Tuning:
        """The boundary-read tuning storage.billing needs."""
        return Tuning(
            actual_window=timedelta(seconds=self.actual_window_s),
            max_gap=timedelta(hours=self.max_gap_h),
        )
