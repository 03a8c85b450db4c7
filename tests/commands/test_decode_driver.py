"""`nbmeter decode --driver FILE`: try a driver file from the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from decoder import drivers
from nbmeter.cli import main

ACME = "AC4E0186001234567887D61200804F1200807E0E6B00001C0EA13A39"


@pytest.fixture
def shipped_acme() -> Iterator[str]:
    """The shipped ACME NB-1 driver text; the shipped driver is restored afterwards."""
    text = resources.files("decoder.drivers").joinpath("builtin/acme_nb1.toml").read_text()
    original = next(d for d in drivers.installed() if d.name == "acme_nb1")
    yield text
    drivers.uninstall("acme_nb1")
    drivers.install(original)


def test_decode_with_a_driver_file_replacing_the_shipped_one(
    tmp_path: Path, shipped_acme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver file given with --driver decodes the frames (here: battery in volts x10)."""
    edited = shipped_acme.replace("decimals = 3", "decimals = 2")
    path = tmp_path / "acme.toml"
    path.write_text(edited)
    assert main(["decode", "--driver", str(path), ACME]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["ok"] is True
    assert record["total_m3"] == "123.4567"
    assert record["battery_v"] == "36.12"  # the file's scale, not the shipped one's


def test_decode_refuses_a_malformed_driver_naming_the_line(
    tmp_path: Path, shipped_acme: str
) -> None:
    """A malformed driver file stops the command with its file and line."""
    path = tmp_path / "acme.toml"
    path.write_text(shipped_acme.replace('kind = "crc16_modbus"', 'kind = "crc99"'))
    line = path.read_text().splitlines().index('kind = "crc99"') + 1
    with pytest.raises(SystemExit, match=rf"acme.toml line {line}: checksum kind 'crc99'"):
        main(["decode", "--driver", str(path), ACME])
