"""Bodies of the tenant settings routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.schemas import Zone

Name = Annotated[
    str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]+$", min_length=1, max_length=200)
]


class TenantSettings(BaseModel):
    """The tenant's settings; `slug` and `tenant_id` identify it and cannot change here."""

    tenant_id: int
    slug: str
    name: str
    timezone: str = Field(description="IANA zone: billing cycles and local-time reads")
    allow_plain_coap: bool = Field(
        description="lab use: accept CoAP uplinks without OSCORE (collectors see a change "
        "within 30 s)"
    )
    created_at: datetime


class TenantSettingsPatch(BaseModel):
    """Settings to change (absent ones are kept; null is refused)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"allow_plain_coap": False}]}
    )
    name: Name | None = None
    timezone: Zone | None = Field(
        None,
        description="moves the boundaries of billing cycles not published yet; published "
        "reads keep their values",
    )
    allow_plain_coap: bool | None = None


class SettingsChange(BaseModel):
    """One audited change: who, when, which setting, old and new value."""

    change_id: int
    changed_at: datetime
    changed_by: str
    field: str
    old_value: Any
    new_value: Any
