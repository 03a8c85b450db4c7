"""Array literals (`storage.pgarrays`) on the real server: each casts to the array asyncpg
would have sent as a list, element for element, including the characters a literal must
escape, NULLs and empty arrays; a value of the wrong type is refused in Python."""

from __future__ import annotations

import asyncpg
import pytest

from storage import pgarrays


async def test_literals_equal_the_lists(pool: asyncpg.Pool) -> None:
    """bigint (the int8 extremes too), bytea (empty and every byte) and text (quotes,
    backslashes, braces, commas, spaces, NULL, 'NULL', non-ASCII) come back equal."""
    ints = [0, 1, -1, 2**63 - 1, -(2**63), 2**31]
    blobs = [b"", bytes(range(256)), b'\\"{},', b"\x00"]
    words = ["stored", "", 'a "b"', "c\\d", "{e,f}", " g ", None, "NULL", "überlauf", "\\"]
    async with pool.acquire() as conn:
        got = await conn.fetchrow(
            "SELECT $1::text::bigint[], $2::text::bytea[], $3::text::text[],"
            " $4::text::bigint[], $5::text::text[]",
            pgarrays.bigints(ints),
            pgarrays.byteas(blobs),
            pgarrays.texts(words),
            pgarrays.bigints([]),
            pgarrays.texts([]),
        )
    assert got is not None
    assert list(got[0]) == ints
    assert list(got[1]) == blobs
    assert list(got[2]) == words
    assert list(got[3]) == []
    assert list(got[4]) == []


def test_wrong_types_are_refused() -> None:
    """A float or a str among bigints, a str among byteas: TypeError or AttributeError,
    never a literal that casts to something else."""
    with pytest.raises(TypeError):
        pgarrays.bigints([1, 2.5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        pgarrays.bigints(["3"])  # type: ignore[list-item]
    with pytest.raises(AttributeError):
        pgarrays.byteas(["ab"])  # type: ignore[list-item]
