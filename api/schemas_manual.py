"""Bodies of manual reads and historical read imports (registers: m3 strings or int mL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from api.schemas import M3, Address
from billing import units
from storage.rows import READ_S_MAX_EPOCH

# readings hold int4 seconds since 2000 (migration 0054): up to 2068-01-19T03:14:07Z
_EARLIEST, _LATEST = (
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime.fromtimestamp(READ_S_MAX_EPOCH + 1, UTC),
)


def _plausible(at: datetime) -> datetime:
    """`at` in UTC if within 1970-01-01 .. 2068-01-19T03:14:07Z (what a reading can hold)."""
    try:
        utc = at.astimezone(UTC)
    except OverflowError:
        utc = _LATEST
    if not _EARLIEST <= utc < _LATEST:
        msg = "a time between 1970-01-01 and 2068-01-19T03:14:07Z, with its UTC offset"
        raise ValueError(msg)
    return utc


ReadAt = Annotated[AwareDatetime, AfterValidator(_plausible)]
MAX_ML = 10**18  # 10^12 m3: the M3 type's bound, inside bigint
Note = Annotated[
    str, StringConstraints(pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$", min_length=1, max_length=500)
]
MeterIdValue = Annotated[int, Field(ge=1, le=2**63 - 1)]
RegisterMl = Annotated[int, Field(ge=0, lt=MAX_ML, description="register in millilitres")]
Quality = Annotated[
    int,
    Field(
        ge=0,
        le=19,
        description="ESPI QualityOfReading the old system gave it (default 7, manually edited);"
        " one of 0, 7-12, 14, 16-19",
    ),
]


class _Register(BaseModel):
    """Exactly one of register_m3 (decimal string) and register_ml (integer)."""

    register_m3: M3 | None = None
    register_ml: RegisterMl | None = None

    @model_validator(mode="after")
    def _one_register(self) -> Self:
        if (self.register_m3 is None) == (self.register_ml is None):
            msg = "give the register as register_m3 (decimal string) or register_ml, not both"
            raise ValueError(msg)
        return self

    def millilitres(self) -> int:
        """The register in exact mL."""
        if self.register_ml is not None:
            return self.register_ml
        return units.ml(str(self.register_m3))  # M3 has at most 6 decimals: exact


class ManualReadCreate(_Register):
    """A register read by a person: a meter reader's visit, a customer's photo."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "read_at": "2024-03-01T09:30:00+08:00",
                    "register_m3": "123.456",
                    "source": "visit",
                    "note": "meter in basement, photo on file",
                }
            ]
        },
    )
    read_at: ReadAt = Field(description="when it was read (with a UTC offset)")
    source: Literal["visit", "customer_photo", "other"]
    note: Note | None = None


class ImportRow(_Register):
    """One row of a historical import: the meter by id or address, when, the register."""

    model_config = ConfigDict(extra="forbid")
    meter_id: MeterIdValue | None = None
    address: Address | None = None
    read_at: ReadAt
    quality: Quality = 7
    note: Note | None = None

    @model_validator(mode="after")
    def _meter_named(self) -> Self:
        if self.meter_id is None and self.address is None:
            raise ValueError("name the meter: meter_id or address")
        return self


class ManualRead(BaseModel):
    """An entered reading with its bookkeeping."""

    meter_id: int
    read_at: datetime
    register_m3: str | None
    quality: int = Field(description="ESPI QualityOfReading: 7 manually edited for manual reads")
    source: Literal["visit", "customer_photo", "other", "import"]
    note: str | None
    entered_by: str = Field(description="`key:<api key id>` or `cli:<name>`")
    entered_at: datetime
    import_id: int | None


class ImportAccepted(BaseModel):
    """An accepted import: every row is stored now or was already (same value)."""

    import_id: int
    rows: int
    stored: int
    duplicates: int = Field(description="rows whose reading was stored already (same value)")
    replayed: bool = Field(description="this body was imported before; nothing was done")
