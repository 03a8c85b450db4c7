"""The sealed OSCORE context (`storage.credentials.oscore_blob` / `open_oscore_blob`): the
binary layout round-trips with and without derived keys, contexts sealed as JSON before
it still open, and a plaintext of neither kind is refused, never half-read."""

from __future__ import annotations

import json
import secrets

import pytest

from storage import credentials

KEY = bytes(range(32))


def sealed(plaintext: bytes, meter_id: int = 7) -> bytes:
    """`plaintext` sealed for `meter_id` as the credentials store seals it."""
    return credentials.seal(KEY, plaintext, meter_id)


def test_binary_blob_round_trips() -> None:
    """Secret, salt and the derived keys come back as given; without derived keys, None."""
    secret, salt = secrets.token_bytes(16), secrets.token_bytes(8)
    derived = (secrets.token_bytes(16), secrets.token_bytes(16), secrets.token_bytes(13))
    blob = credentials.oscore_blob(secret, salt, derived)
    assert blob[0] == 1
    assert credentials.open_oscore_blob(KEY, sealed(blob), 7) == (secret, salt, derived)
    bare = credentials.oscore_blob(secret, b"")  # an empty salt is RFC 8613's default
    assert credentials.open_oscore_blob(KEY, sealed(bare), 7) == (secret, b"", None)


def test_json_blob_sealed_before_still_opens() -> None:
    """A context sealed as JSON of hex strings (before the binary layout) opens the same."""
    secret, salt = secrets.token_bytes(16), secrets.token_bytes(8)
    derived = (secrets.token_bytes(16), secrets.token_bytes(16), secrets.token_bytes(13))
    old = {"secret": secret.hex(), "salt": salt.hex()}
    assert credentials.open_oscore_blob(KEY, sealed(json.dumps(old).encode()), 7) == (
        secret,
        salt,
        None,
    )
    old.update(sender_key=derived[0].hex(), recipient_key=derived[1].hex())
    old["common_iv"] = derived[2].hex()
    assert credentials.open_oscore_blob(KEY, sealed(json.dumps(old).encode()), 7) == (
        secret,
        salt,
        derived,
    )


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",  # nothing
        b"\x02\x01a\x01b",  # a version this code does not know
        b"\x01\x10" + bytes(8),  # a field longer than what is left
        b"\x01\x01a",  # one field only
        b"\x01\x01a\x01b\x01c",  # three fields: neither 2 nor 5
    ],
)
def test_other_plaintexts_are_refused(plaintext: bytes) -> None:
    """What is neither layout is a CredentialsError naming the meter."""
    with pytest.raises(credentials.CredentialsError, match="meter 7"):
        credentials.open_oscore_blob(KEY, sealed(plaintext), 7)


def test_oversized_field_is_refused_when_sealing() -> None:
    """A field the one length byte cannot say is refused before anything is stored."""
    with pytest.raises(ValueError, match="255 bytes"):
        credentials.oscore_blob(bytes(256), b"")
