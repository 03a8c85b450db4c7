"""Platform push envelopes, sans-I/O (devices.platforms) and `nbmeter decode --platform`.

Shapes as documented: OneNET HTTP push
https://open.iot.10086.cn/doc/nb-iot/book/manual/httppush/develop-manual.html; OceanConnect
deviceDataChanged https://support.huaweicloud.com/intl/en-us/api-IoT/iot_06_0035.html and
deviceDatasChanged https://support.huaweicloud.com/intl/en-us/api-IoT/iot_06_0036.html.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import pytest
from collector_testkit import cjt188_frame

from devices import platforms
from devices.platforms import PushRejected, Window, oceanconnect_body, onenet_body
from nbmeter.commands.decode import add_arguments, run_decode

NOW = 1_800_000_000.0
FRAME = cjt188_frame("12345678901234", 1_230_000, 1_799_996_400)


def _item(value: str, at_s: float = NOW, **extra: object) -> dict[str, object]:
    return (
        {"type": 1, "dev_id": 42, "imei": "869975031234567", "at": int(at_s * 1000)}
        | {"value": value}
        | extra
    )


def test_onenet_signature_is_checked_over_msg_as_sent() -> None:
    """A push signed as OneNET documents verifies, also when the platform's JSON has
    spaces (the signature covers msg's text as sent, not a re-serialisation)."""
    at_ms = int(NOW * 1000)
    msg = f'{{"type": 1, "imei": "869975031234567", "at": {at_ms}, "value": "{FRAME.hex()}"}}'
    signature = platforms.onenet_signature(b"tok", "nonce1", msg)
    body = f'{{"msg": {msg}, "msg_signature": "{signature}", "nonce": "nonce1"}}'.encode()
    env = platforms.read("onenet", body)
    platforms.verify(env, b"tok", NOW, Window())
    assert [m.payload for m in env.messages] == [FRAME]
    assert env.messages[0].device_id == "869975031234567"


def test_onenet_tampered_value_fails_the_signature() -> None:
    """Changing the payload after signing is a bad signature (401)."""
    body = onenet_body([_item(FRAME.hex())], b"tok", "n")
    tampered = body.replace(FRAME.hex().encode(), FRAME.hex().replace("68", "69", 1).encode())
    env = platforms.read("onenet", tampered)
    with pytest.raises(PushRejected) as err:
        platforms.verify(env, b"tok", NOW, Window())
    assert (err.value.status, err.value.code) == (401, "bad_signature")


def test_onenet_batch_ignores_status_messages_and_takes_base64() -> None:
    """A batch: data points (hex or base64 values) are uplinks; online/offline (type 2)
    messages are counted as ignored; dev_id is the identity when there is no imei."""
    items = [
        _item(FRAME.hex()),
        {"type": 2, "dev_id": 42, "status": 1, "login_type": 10, "at": int(NOW * 1000)},
        {"type": 1, "dev_id": 77, "at": int(NOW * 1000), "value": base64.b64encode(FRAME).decode()},
    ]
    env = platforms.read("onenet", onenet_body(items, b"tok", "n"))
    assert env.ignored == 1
    assert [(m.device_id, m.payload) for m in env.messages] == [
        ("869975031234567", FRAME),
        ("77", FRAME),
    ]


@pytest.mark.parametrize(
    ("age_s", "ok"), [(3599, True), (3601, False), (-299, True), (-301, False)]
)
def test_time_window(age_s: float, ok: bool) -> None:
    """A message's platform time may be up to max_age_s old and max_ahead_s ahead."""
    env = platforms.read("onenet", onenet_body([_item(FRAME.hex(), NOW - age_s)], b"t", "n"))
    if ok:
        platforms.verify(env, b"t", NOW, Window(3600, 300))
        return
    with pytest.raises(PushRejected) as err:
        platforms.verify(env, b"t", NOW, Window(3600, 300))
    assert err.value.code == "stale"


def test_oceanconnect_single_and_batch_shapes() -> None:
    """deviceDataChanged (service) and deviceDatasChanged (services, or `service` as a list
    as in the documentation's own example) give one uplink per service; rawData is base64."""
    one = platforms.read("oceanconnect", oceanconnect_body("dev-1", [(FRAME, NOW)], "r1"))
    assert [(m.device_id, m.payload, m.at_s) for m in one.messages] == [("dev-1", FRAME, NOW)]
    doc = json.loads(oceanconnect_body("dev-1", [(FRAME, NOW), (FRAME, NOW)], "r2"))
    doc["service"] = doc.pop("services")
    doc["service"][1]["data"] = {"rawData": base64.b64encode(FRAME).decode()}
    batch = platforms.read("oceanconnect", json.dumps(doc).encode())
    assert [m.payload for m in batch.messages] == [FRAME, FRAME]


def test_oceanconnect_token_in_url() -> None:
    """OceanConnect signs nothing: the callback URL's secret must match (401 otherwise)."""
    env = platforms.read("oceanconnect", oceanconnect_body("dev-1", [(FRAME, NOW)], "r1"))
    platforms.verify(env, b"s3cret", NOW, Window(), url_token="s3cret")
    for token in (None, "s3cre", "wrong!"):
        with pytest.raises(PushRejected) as err:
            platforms.verify(env, b"s3cret", NOW, Window(), url_token=token)
        assert err.value.status == 401


def test_other_notify_types_are_ignored() -> None:
    """A notify type without data (deviceInfoChanged) is acknowledged, nothing to store."""
    env = platforms.read("oceanconnect", b'{"notifyType": "deviceInfoChanged", "deviceId": "d"}')
    assert (env.messages, env.ignored) == ((), 1)


@pytest.mark.parametrize(
    ("platform", "body", "why"),
    [
        ("onenet", b'{"msg": {"type": 1, "at": 1, "imei": "1", "value": "zz"}, '
         b'"msg_signature": "x", "nonce": "n"}', "neither hex nor base64"),
        ("onenet", b'{"msg": {"type": 1, "imei": "1", "value": "68"}, "msg_signature": "x", '
         b'"nonce": "n"}', ".at"),
        ("oceanconnect", b'{"notifyType": "deviceDataChanged", "deviceId": "d", "service": '
         b'{"data": {"x": 1}, "eventTime": "20170214T170220Z"}}', "no single hex payload"),
        ("oceanconnect", b'{"notifyType": "deviceDataChanged", "deviceId": "d", "service": '
         b'{"data": {"x": "68"}, "eventTime": "2017-02-14"}}', "eventTime"),
        ("onenet", b"[" * 40 + b"]" * 40, "nested deeper"),
    ],
)  # fmt: skip
def test_malformed_envelopes_say_why(platform: str, body: bytes, why: str) -> None:
    """Bodies that are not the documented envelope are 400 with a reason naming the field."""
    with pytest.raises(PushRejected) as err:
        platforms.read(platform, body)
    assert err.value.status == 400
    assert why in err.value.detail


def test_too_many_messages_is_413() -> None:
    """A push carrying more than MAX_MESSAGES messages is refused whole."""
    items = [_item(FRAME.hex())] * (platforms.MAX_MESSAGES + 1)
    with pytest.raises(PushRejected) as err:
        platforms.read("onenet", onenet_body(items, b"t", "n"))
    assert err.value.status == 413


def test_decode_command_shows_what_a_push_carries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nbmeter decode --platform onenet FILE`: the identity, the platform time and the
    decoded reading of each message; status messages are counted as ignored."""
    now = time.time()
    items = [_item(FRAME.hex(), now), {"type": 2, "dev_id": 42, "status": 0, "at": 1}]
    path = tmp_path / "push.json"
    path.write_bytes(onenet_body(items, b"t", "n"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the command's own parser: a new option gets its default here too
    assert run_decode(parser.parse_args([str(path), "--platform", "onenet"])) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["device_id"] == "869975031234567"
    assert lines[0]["address"] == "12345678901234"
    assert lines[0]["total_m3"] == "1.23"
    assert lines[1]["ignored"] == 1
